"""bundler bench against a real llama-server (the bundle's CPU build and model)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(bundle_dir, tmp_path):
    port = _free_port()
    eng = bundle_dir / "engines" / "llama.cpp-cpu"
    env = dict(os.environ, LD_LIBRARY_PATH=str(eng / "lib"), LLAMA_API_KEY="bench-key")
    log = open(tmp_path / "server.log", "w")
    model = bundle_dir / "models/gemma-3-270m-q4_k_m.gguf"
    proc = subprocess.Popen([str(bundle_dir / json.loads((bundle_dir / "manifest.json").read_text())["engines"][0]
                                 ["binary"]), "-m", str(model),
                             "--host", "127.0.0.1", "--port", str(port), "-np", "2", "-c", "4096", "--alias", "gemma",
                             "--offline", "--no-webui"], env=env, stdout=log, stderr=log)
    try:
        for _ in range(200):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bench_reports_throughput_latency_and_exact_output_counts(server, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bench", "--url", server, "--model", "gemma",
                        "--api-key", "bench-key", "--concurrency", "1,2", "--requests", "4", "--prompt-tokens", "64",
                        "--max-tokens", "16", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert lv["errors"] == 0
        assert lv["output_tokens"] == 4 * 16  # ignore_eos: every request gives exactly max_tokens
        assert lv["tok_s"] > 0
        assert 0 < lv["ttft_p50"] <= lv["latency_p50"] <= lv["latency_p95"]
    assert "tok/s" in r.stdout
    png = tmp_path / "both.png"
    p = subprocess.run([sys.executable, "-m", "bundler.cli", "plot", str(out), str(out), "--out", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "bundler.cli", "plot", str(tmp_path / "nope.json"), "--out",
                          str(png)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "nope.json" in bad.stderr


def test_bench_counts_errors_when_the_key_is_wrong(server):
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bench", "--url", server, "--model", "gemma",
                        "--api-key", "wrong", "--concurrency", "1", "--min-requests", "2", "--max-tokens", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "2 request(s) failed" in r.stderr
    assert "HTTP 401" in r.stdout
