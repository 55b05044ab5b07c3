"""A chat model and an embedding model in one bundle, each served by its own llama-server on its
own port, behind the one API key, offline, as one service (issue #13)."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

CHAT, EMBED = 18130, 18131


def _post(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def test_chat_and_embedding_models_served_side_by_side(two_model_bundle_dir, netns, tmp_path):
    b = two_model_bundle_dir
    doc = json.loads((b / "manifest.json").read_text())
    assert [(m["name"], m["task"], m["port"]) for m in doc["models"]] == [("chat", "chat", CHAT),
                                                                         ("embed", "embed", EMBED)]
    assert sum(f["path"].startswith("models/") for f in doc["files"]) == 1  # one file, bundled once
    prefix = tmp_path / "p"
    r = netns.run([str(b / "install.sh"), "--prefix", str(prefix), "--json"])
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)
    # the plan said how the box was shared between them
    assert "planned with what the bundle's other models leave: embed (embed, llama.cpp cpu" in r.stderr
    assert "mean pooling: the GGUF names none" in r.stderr
    assert [(m["model"], m["task"], m["endpoint"]) for m in out["models"]] == [
        ("chat", "chat", f"http://127.0.0.1:{CHAT}/v1"), ("embed", "embed", f"http://127.0.0.1:{EMBED}/v1")]
    assert "cosine" in r.stderr  # the embedding smoke test ran and passed: same meaning closer than another
    key = (prefix / "etc" / "chat-and-embed.env").read_text().split("LLAMA_API_KEY=")[1].split()[0]

    texts = ["The capital of France is Paris.", "Paris is the capital city of France.", "Bananas are yellow."]
    out_of_ns = netns.run([sys.executable, "-c", f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.e2e.test_two_models import _post
e = _post('http://127.0.0.1:{EMBED}/v1/embeddings', {{'model': 'embed', 'input': {texts!r}}}, {key!r})
e0 = _post('http://127.0.0.1:{EMBED}/v1/embeddings', {{'model': 'embed', 'input': 'x'}}, None)
c = _post('http://127.0.0.1:{CHAT}/v1/chat/completions', {{'model': 'chat', 'max_tokens': 8,
          'messages': [{{'role': 'user', 'content': 'Hi'}}]}}, {key!r})
c0 = _post('http://127.0.0.1:{CHAT}/v1/chat/completions', {{'model': 'chat',
           'messages': [{{'role': 'user', 'content': 'Hi'}}]}}, None)
print(json.dumps([e, e0[0], c[0], c0[0]]))
"""])
    assert out_of_ns.returncode == 0, out_of_ns.stderr
    (code, emb), no_key_embed, chat_code, no_key_chat = json.loads(out_of_ns.stdout)
    assert (code, no_key_embed, chat_code, no_key_chat) == (200, 401, 200, 401)
    vecs = [d["embedding"] for d in emb["data"]]
    assert len(vecs) == 3 and len({len(v) for v in vecs}) == 1 and len(vecs[0]) == 640  # gemma-3-270m's width

    # one service: both engines under one supervisor; an engine that dies takes the service down
    # and back up whole
    release = prefix / "chat-and-embed" / "current"
    assert (release / "bin" / "launch-0").is_file() and (release / "bin" / "launch-1").is_file()
    log = prefix / "chat-and-embed" / "log" / "chat-and-embed.log"
    text = log.read_text()
    assert "[chat] " in text and "[embed] " in text
    pids = subprocess.run(["pgrep", "-f", "--", f"--port {EMBED}"], capture_output=True, text=True).stdout.split()
    assert pids, "the embedding engine is not running"
    subprocess.run(["kill", "-9", *pids])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "stopping the others" in log.read_text() and _healthy(netns, CHAT) and _healthy(netns, EMBED):
            break
        time.sleep(1)
    else:
        pytest.fail("the service did not come back whole after its embedding engine was killed:\n" +
                    log.read_text()[-3000:])
    subprocess.run([str(release / "bin" / "ctl"), "stop"], check=True)
    assert not subprocess.run(["pgrep", "-f", "--", f"--port {EMBED}"], capture_output=True).stdout  # none left behind


def _healthy(netns, port: int) -> bool:
    r = netns.run(["python3", "-c", f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/health', "
                                    "timeout=2)"])
    return r.returncode == 0


FAKE_ENGINE = r"""#!{python}
# a stand-in engine: notes when it starts, loads for {delay} s, then answers /health on {port}
import http.server, sys, time
open({log!r}, "a").write(f"{name} start {{time.monotonic()}}\n")
print("loading", flush=True)
time.sleep({delay})
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
open({log!r}, "a").write(f"{name} healthy {{time.monotonic()}}\n")
http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
"""


def test_engines_that_size_themselves_from_gpu_memory_start_one_after_another(tmp_path):
    """With vLLM in the group, the next engine starts only once the one before answers /health
    (two vLLM engines loading at once each counted the other's memory as their own: the small one
    found no memory for its KV cache on the GPU box); SIGTERM stops them all."""
    from bundler.render import render

    log = tmp_path / "order.log"
    paths = []
    for name, port, delay in (("embed", 18141, 2), ("chat", 18140, 0)):
        p = tmp_path / f"launch-{name}"
        p.write_text(FAKE_ENGINE.format(python=sys.executable, delay=delay, port=port, log=str(log), name=name))
        p.chmod(0o755)
        paths.append(str(p))
    group = tmp_path / "launch"
    group.write_text(render("group.sh.j2", {"name": "t", "release": "r", "python": sys.executable, "members": [
        ("org/embed model", paths[0], "http://127.0.0.1:18141/health"), ("chat", paths[1], "")]}))  # any name
    group.chmod(0o755)
    proc = subprocess.Popen([str(group)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "chat healthy" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.2)
        events = dict(((line.split()[0], line.split()[1]), float(line.split()[2]))
                      for line in log.read_text().splitlines())
        assert events[("chat", "start")] >= events[("embed", "healthy")]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert "[org/embed model] loading" in out and "[chat] loading" in out  # each line names its model
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "launch-")], capture_output=True).stdout


def test_an_engine_that_ignores_sigterm_is_killed_with_everything_it_started(tmp_path):
    """The supervisor stops its command with SIGTERM, then after 20 s kills its whole process group:
    a group of engines (or vLLM's workers) is not left holding ports and GPUs when one hangs."""
    launch = tmp_path / "launch"
    pids = tmp_path / "pids"
    launch.write_text(f"#!/bin/sh\ntrap '' TERM\nsh -c 'echo $$ >> {pids}; exec sleep 300' &\necho $$ >> {pids}\n"
                      "while :; do sleep 1; done\n")
    launch.chmod(0o755)
    pidfile, log = tmp_path / "sup.pid", tmp_path / "sup.log"
    sup = subprocess.Popen([sys.executable, "-m", "bundler.supervise", "--pidfile", str(pidfile), "--log", str(log),
                            "--", str(launch)], cwd=str(ROOT))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.2)
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    sup.terminate()
    sup.wait(timeout=60)
    assert "killing it and everything it started" in log.read_text()
    for pid in started:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
