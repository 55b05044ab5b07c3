"""Issue #14: TabbyAPI, ExLlama's server (both generations' commits), as a release starts it
(bundler.engines.tabby_run), run for real here from the pinned archives (third_party/) and their
dependencies locked for this Python.
No GPU here, so no model is loaded (TabbyAPI's own `unsafe_launch` skips its torch/exllamavN check);
what is tested is what the release adds around TabbyAPI: the private working folder, the key as
TabbyAPI's api_key and a random admin key nobody is told, every route but /health behind the key,
neither key in the log, a config the server accepts, and no attempt to reach beyond loopback
(run in the egress audit's network namespace)."""

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bundler import egress, lock
from bundler.box import wheels
from bundler import engines
from bundler.engines import exllama, vllm
from bundler import boxlock
from bundler.engines.exllama import build as exllama_build

pytestmark = pytest.mark.e2e
KEY = "k-" + "7" * 40


CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
base, key, guarded = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def get(path, k=None, method="GET"):
    req = urllib.request.Request(base + path, method=method, data=b"{}" if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {k}"} if k else {})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

deadline = time.monotonic() + 120
while True:
    try:
        health = get("/health")
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("TabbyAPI never listened")
        time.sleep(0.5)
out = {"health": health, "models": get("/v1/models", key), "unload": get("/v1/model/unload", key, "POST"),
       "permission": get("/v1/auth/permission", key),
       "guarded": [[m, p, get(p, None, m)[0], get(p, "wrong-key", m)[0]] for m, p in guarded]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module", params=[exllama.V2, exllama.V3], ids=lambda g: g.name)
def tabby_site(request, tmp_path_factory):
    """TabbyAPI's tree and its dependencies, locked and fetched as make bundle does (uv, hash-checked):
    exl2-checkpoint (ExLlamaV2) and main (ExLlamaV3)."""
    gen = request.param
    root = tmp_path_factory.mktemp(f"tabby-{gen.name}")
    files = exllama_build.read_archive(gen.tabby_archive, gen.tabby_sha256, gen)
    for rel, data in files.items():
        (root / "tabbyapi" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "tabbyapi" / rel).write_bytes(data)
    here = types.SimpleNamespace(python=".".join(map(str, sys.version_info[:3])), glibc="2.36", arch="x86_64",
                                 installed={})
    reqs = [r for r in exllama_build.requirements(files, gen.version, gen) if not r.startswith(gen.name)]
    carry, _ = boxlock.lock_requirements(reqs, here, root, "TabbyAPI", log=lambda *_: None)
    got = boxlock.download(carry, here, lock.wheel_cache() / "exllama", log=lambda *_: None)
    wheels.install(got, root / "site")
    return gen, root


def test_tabbyapi_serves_behind_the_key_from_a_private_folder_and_reaches_nowhere(tabby_site, tmp_path):
    gen, tabby_site = tabby_site
    port = 18190
    model = tmp_path / "stored-model"
    model.mkdir()
    plan = types.SimpleNamespace(engine=gen.name, engine_defaults=False, context_per_slot=4096, slots=1,
                                 tensor_parallel=1, gpu_split_gib=())
    conf = exllama.tabby_config(plan, str(model), "", "127.0.0.1", port)
    conf["developer"]["unsafe_launch"] = True  # no torch or exllamav2 here: start without a model
    (tmp_path / "conf.json").write_text(json.dumps(conf))
    run_base = tmp_path / "cache"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, VLLM_API_KEY=KEY, AIRGAP_LLM_RUN_DIR=str(run_base),
               PYTHONPATH=f"{tabby_site / 'site'}:{repo}", **vllm.OFFLINE_ENV)
    with egress.AuditedNamespace(tmp_path / "egress.jsonl") as ns, open(tmp_path / "engine.log", "wb") as log:
        proc = subprocess.Popen(ns.argv([sys.executable, "-m", "bundler.engines.tabby_run",
                                         str(tabby_site / "tabbyapi"), str(tmp_path / "conf.json")]),
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            r = subprocess.run(ns.argv([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}", KEY,
                                        json.dumps(engines.get(gen.name).guarded)]), capture_output=True, text=True,
                               timeout=180)
            assert r.returncode == 0, r.stderr + (tmp_path / "engine.log").read_text()[-3000:]
            got = json.loads(r.stdout)
            run = run_base / f"tabbyapi-{port}"
            assert run.stat().st_mode & 0o777 == 0o700
            tokens = run / "api_tokens.yml"
            assert tokens.stat().st_mode & 0o777 == 0o600
            admin = json.loads(tokens.read_text())["admin_key"]
            written = json.loads((run / "config.yml").read_text())
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        attempts = ns.attempts()
    assert got["health"][0] in (200, 503), got  # healthy, or "no model loaded" as TabbyAPI reports it
    assert got["models"][0] == 200 and "data" in json.loads(got["models"][1]), got
    for method, path, without, wrong in got["guarded"]:
        assert (without, wrong) == (401, 401), (method, path)
    # the service's key is no admin key: loading or unloading models needs the random one nobody is told
    assert got["unload"][0] == 401
    assert got["permission"][0] == 200 and json.loads(got["permission"][1])["permission"] == "api"
    assert len(admin) == 64 and admin != KEY
    assert not (tabby_site / "tabbyapi" / "api_tokens.yml").exists()  # nothing written into the release
    assert written["network"]["disable_fetch_requests"] is True
    text = (tmp_path / "engine.log").read_text()
    assert "Your API key is: ****" in text  # TabbyAPI's line, with the keys masked
    assert KEY not in text and admin not in text
    assert attempts == [], egress.summary(attempts)  # TabbyAPI and its imports reached for nothing
