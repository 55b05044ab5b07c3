"""Whole model repositories from a hub (a local fake speaking the Hugging Face and ModelScope
HTTP APIs): locked beside the spec, every file pinned and checked, resumed after a cut, cached
by content, bundled and verified, and planned for vLLM on a GPU box."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundler.cache import cache_root
from tests.conftest import ROOT
from tests.fakehub import Hub, tiny_llama_repo

pytestmark = pytest.mark.e2e


@pytest.fixture
def hub():
    h = Hub(repos={"org/tiny": tiny_llama_repo()}).start()
    yield h
    h.stop()


def _env(tmp_path: Path, hub: Hub) -> dict[str, str]:
    return dict(os.environ, HF_ENDPOINT=hub.url, MODELSCOPE_ENDPOINT=hub.url, AIRGAP_LLM_CACHE=str(tmp_path / "cache"),
                AIRGAP_LLM_WHEELS=str(cache_root() / "wheels"), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1",
                no_proxy="127.0.0.1")


def _spec(tmp_path: Path, source: str, extra: str = "") -> Path:
    spec = tmp_path / "repo.toml"
    spec.write_text('[bundle]\nname = "tiny-repo"\nmodels_only = true\n'  # carried for another bundle's vLLM
                    f'[[models]]\nname = "tiny"\nsource = "{source}"\n{extra}\n'
                    '[engines.llama_cpp]\nbackends = []\n[target]\npythons = ["3.11"]\n')
    return spec


def _bundle(spec: Path, out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(spec), "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("scheme,branch", [("hf", "main"), ("modelscope", "master")])
def test_a_whole_repo_is_locked_verified_and_planned_for_vllm(hub, tmp_path, scheme, branch):
    env = _env(tmp_path, hub)
    repo = hub.repos["org/tiny"]
    shard = "model-00002-of-00002.safetensors"
    hub.cut_after[shard] = 70_000  # the first download of this shard is cut short: it resumes where it stopped
    spec = _spec(tmp_path, f"{scheme}://org/tiny@{branch}")
    r = _bundle(spec, tmp_path / "dist", env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming at 65536 bytes" in r.stdout + r.stderr  # what arrived whole (64 KiB blocks) is kept
    # the lock beside the spec: the branch resolved to its commit, every file with size and sha256
    lock = json.loads((tmp_path / "repo.models.lock").read_text())["models"]["tiny"]
    assert lock["commit"] == repo.commit and lock["source"] == f"{scheme}://org/tiny@{branch}"
    import hashlib

    assert {f["path"]: (f["size"], f["sha256"]) for f in lock["files"]} == {
        p: (len(d), hashlib.sha256(d).hexdigest()) for p, d in repo.files.items()}
    b = tmp_path / "dist" / "tiny-repo"
    doc = json.loads((b / "manifest.json").read_text())
    m = doc["models"][0]
    assert (m["format"], m["commit"], m["file"], m["dir"]) == ("safetensors", repo.commit, "models/tiny", True)
    assert m["facts"]["layers"] == 2 and m["facts"]["kv_heads"] == 2
    for p, data in repo.files.items():
        assert (b / "models/tiny" / p).read_bytes() == data
    v = subprocess.run([sys.executable, "-m", "bundler.cli", "verify", str(b)], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    plan = subprocess.run([sys.executable, "-m", "bundler.cli", "plan", "--model", str(b / "models/tiny"), "--box",
                           str(ROOT / "tests/data/boxes/device-h200x2-probe.json"), "--concurrency", "8", "--json"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["engine"] == "vllm"

    # a second bundle of the same repo downloads nothing: the lock and the content cache serve it
    before = dict(hub.downloads)
    r2 = _bundle(spec, tmp_path / "dist2", env)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-2000:]
    assert hub.downloads == before
    assert "locked at commit" in r2.stdout + r2.stderr


def test_bytes_that_do_not_match_the_hubs_sha256_are_refused_naming_the_file(hub, tmp_path):
    env = _env(tmp_path, hub)
    hub.corrupt.add("model-00001-of-00002.safetensors")
    r = _bundle(_spec(tmp_path, "hf://org/tiny@main"), tmp_path / "dist", env)
    assert r.returncode == 1
    assert "model-00001-of-00002.safetensors: sha256 mismatch" in r.stderr
    assert not (tmp_path / "dist" / "tiny-repo").exists()
    assert not list((tmp_path / "cache" / "blobs").glob("*/*.incomplete"))


def test_include_and_exclude_pick_the_files_and_a_moved_branch_needs_upgrade(hub, tmp_path):
    env = _env(tmp_path, hub)
    spec = _spec(tmp_path, "hf://org/tiny@main", 'exclude = ["README.md"]')
    assert _bundle(spec, tmp_path / "d1", env).returncode == 0
    lock = json.loads((tmp_path / "repo.models.lock").read_text())["models"]["tiny"]
    assert "README.md" not in {f["path"] for f in lock["files"]}
    # the branch moves on the hub: the lock keeps the old commit until --upgrade-models
    old = hub.repos["org/tiny"]
    new = tiny_llama_repo(commit="beef" + "1" * 36)
    new.files["config.json"] = old.files["config.json"].replace(b'"rms_norm_eps": 1e-05', b'"rms_norm_eps": 1e-06')
    hub.repos["org/tiny"] = new
    seen = dict(hub.downloads)
    same = _bundle(spec, tmp_path / "d2", env)
    assert same.returncode == 0 and hub.downloads == seen  # built from the lock and the cache alone
    assert json.loads((tmp_path / "repo.models.lock").read_text())["models"]["tiny"]["commit"] == old.commit
    assert (tmp_path / "d2/tiny-repo/models/tiny/config.json").read_bytes() == old.files["config.json"]
    up = _bundle(spec, tmp_path / "d3", env, "--upgrade-models")
    assert up.returncode == 0, up.stderr[-2000:]
    assert json.loads((tmp_path / "repo.models.lock").read_text())["models"]["tiny"]["commit"] == new.commit
    assert (tmp_path / "d3/tiny-repo/models/tiny/config.json").read_bytes() == new.files["config.json"]
