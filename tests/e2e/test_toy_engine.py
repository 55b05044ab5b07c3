"""An engine is one package plus one name in the registry: a toy engine (tests/data/toy_engine: a
made-up format served by a standard-library HTTP server) dropped into a copy of this repository is
bundled, planned, launched, health-checked, smoke-tested and benched by the real bundler and
installer, with no other file changed."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
REGISTRY = "bundler/engines/__init__.py"


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)


def add_toy_engine(repo: Path) -> None:
    """A copy of this repository with the toy engine in it: its package, and one name in the registry."""
    _copy_repo(repo)
    shutil.copytree(ROOT / "tests/data/toy_engine", repo / "bundler/engines/toy")
    registry = (repo / REGISTRY).read_text()
    line = next(x for x in registry.splitlines() if x.startswith("PACKAGES = ("))
    (repo / REGISTRY).write_text(registry.replace(line, line.replace(")", ', "toy")', 1)))


def toy_bundle(repo: Path, tmp_path: Path) -> tuple[Path, str]:
    """The real bundler, run in that copy, on a toy model: (the bundle, what it said on stderr)."""
    model = tmp_path / "answers.toy"
    model.write_text(json.dumps({"capital of france": "Paris, of course.", "": "Hello from the toy engine."}))
    sha = subprocess.run(["sha256sum", str(model)], capture_output=True, text=True, check=True).stdout.split()[0]
    spec = tmp_path / "toy.toml"
    spec.write_text(f'[bundle]\nname = "toy"\nversion = "1.0.0"\n\n[[models]]\nname = "toy-1"\nsource = "{model}"\n'
                    f'sha256 = "{sha}"\nformat = "toy"\n\n[service]\nconcurrency = 3\n\n'
                    '[engines.llama_cpp]\nbackends = []\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(spec), "--out", str(tmp_path / "dist")],
                       cwd=repo, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp_path / "dist" / "toy", r.stderr


def test_a_toy_engine_is_one_package_and_one_registry_line(tmp_path, netns, signing_home):
    repo = tmp_path / "repo"
    add_toy_engine(repo)
    # nothing else of the repository changed: one line of the registry, and the new package
    diff = subprocess.run(["git", "diff", "--no-index", "--numstat", str(ROOT / REGISTRY), str(repo / REGISTRY)],
                          capture_output=True, text=True).stdout.split()
    assert diff[:2] == ["1", "1"], diff

    bundle, said = toy_bundle(repo, tmp_path)
    assert "==> the toy engine (nothing to build)" in said
    doc = json.loads((bundle / "manifest.json").read_text())
    assert [e["name"] for e in doc["engines"]] == ["toy"]
    assert doc["models"][0]["facts"]["format"] == "toy"

    prefix = tmp_path / "prefix"
    cmd = [str(bundle / "install.sh"), "--prefix", str(prefix), "--port", "18090", "--json", "--bench",
           "--bench-levels", "1,3", "--bench-max-tokens", "8"]
    # the engine runs on the installer's python as its own account (nobody here): a python that account
    # cannot start (one under /root, 0700) is refused before anything changes, naming what to do
    hidden = Path(sys.base_prefix) / "bin" / "python3"
    if str(hidden).startswith("/root/"):
        r = netns.run(cmd, env=dict(os.environ, AIRGAP_LLM_PYTHON=str(hidden)), timeout=600)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "cannot start" in r.stderr and "/root: a folder above" in r.stderr, r.stderr
        assert "AIRGAP_LLM_PYTHON=/usr/bin/python3" in r.stderr
        assert not (prefix / "toy" / "releases").exists() or not any((prefix / "toy" / "releases").iterdir())
    r = netns.run(cmd, env=dict(os.environ, AIRGAP_LLM_PYTHON="/usr/bin/python3"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["engine"] == "toy" and "paris" in out["answer"].lower()
    assert "plan: toy (cpu)" in r.stderr and "3 requests at once" in r.stderr
    levels = {lv["concurrency"]: lv for lv in out["bench"]["levels"]}
    assert set(levels) == {1, 3}
    assert all(lv["errors"] == 0 and lv["output_tokens"] > 0 for lv in levels.values())
    # the engine ran the installed copy of the package, as the engine's user, from the release
    launch = next(prefix.rglob("bin/launch")).read_text()
    assert re.search(r"-m bundler\.engines\.toy\.server", launch)
    stop = netns.run([out["stop_command"]] if " " not in out["stop_command"] else ["sh", "-c", out["stop_command"]])
    assert stop.returncode == 0, stop.stderr
