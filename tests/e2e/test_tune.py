"""install.sh --tune and --bench --baseline against the real CPU llama-server, offline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
B = "gemma3-270m-cpu"
LOAD = ["--bench-levels", "1,2", "--bench-max-tokens", "8", "--concurrency", "2"]


def _chat_ok(netns, port: int, key: str) -> bool:
    ask = ("import sys, json, urllib.request as u\n"
           "r = u.Request(f'http://127.0.0.1:{sys.argv[1]}/v1/completions', method='POST', headers={'Authorization': "
           "'Bearer ' + sys.argv[2]}, data=json.dumps({'prompt': 'Monday, Tuesday, Wednesday,', 'max_tokens': 4, "
           "'temperature': 0}).encode())\n"
           "print(json.load(u.urlopen(r, timeout=60))['choices'][0]['text'])")
    r = netns.run([sys.executable, "-c", ask, str(port), key])
    return r.returncode == 0 and "Thursday" in r.stdout


def _key(out) -> str:
    return next(line.split("=", 1)[1] for line in Path(out["api_key_file"]).read_text().splitlines()
                if line.startswith("LLAMA_API_KEY="))


def test_tune_benches_every_candidate_against_the_defaults_and_installs_the_fastest(bundle_dir, netns, tmp_path):
    prefix = tmp_path / "p"
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18110", "--json", "--tune",
                   *LOAD], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    tuned = out["tune"]
    rows = {c["label"]: c for c in tuned["candidates"]}
    # the plan, llama-server's own defaults (the reference, never installed) and the alternatives
    assert list(rows)[:2] == ["plan", "engine defaults"] and len(rows) >= 3, list(rows)
    assert rows["engine defaults"]["reference"] and rows["engine defaults"]["flags"] == "(the engine's own defaults)"
    for row in rows.values():
        assert row["error"] == "", row
        assert [lv["concurrency"] for lv in row["levels"]] == [1, 2]
        assert all(lv["errors"] == 0 and lv["tok_s"] > 0 for lv in row["levels"])
    chosen = rows[tuned["chosen"]]
    assert not chosen["reference"]
    # the fastest at the target load, or the plan when nothing beat it by more than the noise margin
    best = max((c for c in rows.values() if not c["reference"]), key=lambda c: c["levels"][-1]["tok_s"])
    plan_tok = rows["plan"]["levels"][-1]["tok_s"]
    if best["levels"][-1]["tok_s"] > plan_tok * (1 + tuned["noise"]):
        assert chosen is best
    else:
        assert tuned["chosen"] == "plan"
    assert set(tuned["vs_defaults"]) == {"1", "2"}
    # what the operator sees: the table, and the choice kept in the release beside its plan
    assert "vs defaults" in r.stderr and "* " + tuned["chosen"] in r.stderr
    release = Path(out["release"])
    assert json.loads((release / "tune.json").read_text())["chosen"] == tuned["chosen"]
    plan = json.loads((release / "plan.json").read_text())
    launch = (release / "bin" / "launch").read_text()
    for arg in plan["extra_args"]:
        assert arg in launch
    # every candidate release is gone; the chosen one serves with the key
    assert [p.name for p in (prefix / B / "releases").iterdir()] == [release.name]
    assert _chat_ok(netns, 18110, _key(out))
    subprocess.run([out["ctl"], "stop"], check=True)


def test_tune_within_a_tiny_budget_runs_the_plan_only_and_says_what_it_skipped(bundle_dir, netns, tmp_path):
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--port", "18111", "--json",
                   "--tune", "--tune-budget", "1s", *LOAD], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    rows = out["tune"]["candidates"]
    assert rows[0]["label"] == "plan" and rows[0]["levels"] and out["tune"]["chosen"] == "plan"
    assert all(c["error"] == "skipped: tune budget spent" for c in rows[1:])
    assert "tune budget spent" in r.stderr
    subprocess.run([out["ctl"], "stop"], check=True)


def test_tune_on_an_upgrade_stops_the_running_release_and_serves_again(bundle_dir, netns, tmp_path):
    prefix = tmp_path / "p"
    first = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18112", "--json"])
    assert first.returncode == 0, first.stderr
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18112", "--json", "--tune",
                   "--tune-budget", "1s", *LOAD], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--tune: stopping the running release" in r.stderr
    out = json.loads(r.stdout)
    assert _chat_ok(netns, 18112, _key(out))
    subprocess.run([out["ctl"], "stop"], check=True)


def test_bench_baseline_compares_the_installed_service_with_the_engines_defaults(bundle_dir, netns, tmp_path):
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--port", "18113", "--json",
                   "--bench", "--baseline", *LOAD], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    base = out["baseline"]
    assert [lv["concurrency"] for lv in out["bench"]["levels"]] == [1, 2]
    assert [lv["concurrency"] for lv in base["engine_defaults"]["levels"]] == [1, 2]
    for level in ("1", "2"):
        plan = next(lv["tok_s"] for lv in out["bench"]["levels"] if str(lv["concurrency"]) == level)
        ref = next(lv["tok_s"] for lv in base["engine_defaults"]["levels"] if str(lv["concurrency"]) == level)
        assert base["vs_defaults"][level] == round(plan / ref, 3)
    assert "plan / engine defaults:" in r.stderr
    # the installed service is back, with its key
    assert _chat_ok(netns, 18113, _key(out))
    subprocess.run([out["ctl"], "stop"], check=True)


def test_baseline_without_bench_is_a_usage_error(bundle_dir, tmp_path):
    r = subprocess.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--baseline"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--baseline goes with --bench" in r.stderr
    r = subprocess.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--tune-budget", "soon"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--tune-budget 'soon'" in r.stderr


def test_the_smoke_test_fails_on_noise_and_passes_on_sense(bundle_dir, tmp_path):
    """The old launch line (a template name where llama-server takes a jinja template) made every
    chat prompt the word "gemma": the model answered noise, and a non-empty answer passed."""
    import os
    import socket
    import time
    import urllib.request

    from bundler.box.health import smoke
    from bundler.errors import BundlerError

    doc = json.loads((bundle_dir / "manifest.json").read_text())
    binary = bundle_dir / next(e for e in doc["engines"] if e.get("backend") == "cpu")["binary"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, LLAMA_API_KEY="k")
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([str(binary), "-m", str(bundle_dir / "models/gemma-3-270m-q4_k_m.gguf"), "--port",
                                 str(port), "--alias", "g", "--chat-template", "gemma"], env=env, stdout=log,
                                stderr=log)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(BundlerError) as e:
            smoke(base, "g", "k", "llama.cpp", expect="chat")
        assert "not sensibly" in e.value.message and "Paris" in e.value.message
        assert "--smoke-any-answer" in e.value.hint
        # the same base model continues a plain completion correctly: what its smoke test asks
        assert "Thursday" in smoke(base, "g", "k", "llama.cpp", expect="completion")
        assert smoke(base, "g", "k", "llama.cpp", expect="any")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
