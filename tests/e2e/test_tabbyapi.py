"""Issue #14: TabbyAPI, ExLlamaV2's server, as a release starts it (bundler.engines.tabby_run), run
for real here from the pinned archive (third_party/) and its dependencies locked for this Python.
No GPU here, so no model is loaded (TabbyAPI's own `unsafe_launch` skips its torch/exllamav2 check);
what is tested is what the release adds around TabbyAPI: the private working folder, the key as
TabbyAPI's api_key and a random admin key nobody is told, every route but /health behind the key,
neither key in the log, and a config the server accepts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bundler import lock
from bundler.box import wheels
from bundler.box.health import GUARDED
from bundler.engines import exllama, vllm

pytestmark = pytest.mark.e2e
KEY = "k-" + "7" * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, headers=headers, method=method, data=b"{}" if method == "POST" else None)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def tabby_site(tmp_path_factory):
    """TabbyAPI's tree and its dependencies, locked and fetched as make bundle does (uv, hash-checked)."""
    root = tmp_path_factory.mktemp("tabby")
    files = exllama.read_archive(exllama.TABBY_ARCHIVE, exllama.TABBY_SHA256)
    for rel, data in files.items():
        (root / "tabbyapi" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "tabbyapi" / rel).write_bytes(data)
    here = types.SimpleNamespace(python=".".join(map(str, sys.version_info[:3])), glibc="2.36", arch="x86_64",
                                 installed={})
    reqs = [r for r in exllama.requirements(files, exllama.DEFAULT_VERSION) if not r.startswith("exllamav2")]
    carry, _ = vllm.lock_requirements(reqs, here, root, "TabbyAPI", log=lambda *_: None)
    got = vllm.download(carry, here, lock.wheel_cache() / "exllama", log=lambda *_: None)
    wheels.install(got, root / "site")
    return root


def test_tabbyapi_serves_behind_the_key_from_a_private_folder(tabby_site, tmp_path):
    port = _free_port()
    model = tmp_path / "stored-model"
    model.mkdir()
    plan = types.SimpleNamespace(engine="exllamav2", engine_defaults=False, context_per_slot=4096, slots=1,
                                 tensor_parallel=1, gpu_split_gib=())
    conf = exllama.tabby_config(plan, str(model), "", "127.0.0.1", port)
    conf["developer"]["unsafe_launch"] = True  # no torch or exllamav2 here: start without a model
    (tmp_path / "conf.json").write_text(json.dumps(conf))
    run_base = tmp_path / "cache"
    log = open(tmp_path / "engine.log", "wb")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, VLLM_API_KEY=KEY, AIRGAP_LLM_RUN_DIR=str(run_base),
               PYTHONPATH=f"{tabby_site / 'site'}:{repo}", **vllm.OFFLINE_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "bundler.engines.tabby_run", str(tabby_site / "tabbyapi"),
                             str(tmp_path / "conf.json")], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "engine.log").read_text()[-3000:]
            try:
                code, body = _get(base + "/health")
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "engine.log").read_text()[-3000:]
                time.sleep(0.5)
        assert code in (200, 503), body  # healthy, or "no model loaded" as TabbyAPI reports it
        code, body = _get(base + "/v1/models", KEY)
        assert code == 200, body
        assert "data" in json.loads(body)
        for method, path in GUARDED["exllamav2"]:
            assert _get(base + path, method=method)[0] == 401, path
            assert _get(base + path, "wrong-key", method=method)[0] == 401, path
        # the service's key is no admin key: loading or unloading models needs the random one
        assert _get(base + "/v1/model/unload", KEY, method="POST")[0] == 401
        code, body = _get(base + "/v1/auth/permission", KEY)
        assert code == 200 and json.loads(body)["permission"] == "api", body

        run = run_base / f"tabbyapi-{port}"
        assert run.stat().st_mode & 0o777 == 0o700
        tokens = run / "api_tokens.yml"
        assert tokens.stat().st_mode & 0o777 == 0o600
        admin = json.loads(tokens.read_text())["admin_key"]
        assert len(admin) == 64 and admin != KEY
        assert not (tabby_site / "tabbyapi" / "api_tokens.yml").exists()  # nothing written into the release
        assert json.loads((run / "config.yml").read_text())["network"]["disable_fetch_requests"] is True
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "engine.log").read_text()
    assert "Your API key is: ****" in text  # TabbyAPI's line, with the keys masked
    assert KEY not in text and admin not in text
