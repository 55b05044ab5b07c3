"""Issue #14, bundle side: ExLlamaV2 / ExLlamaV3 and TabbyAPI locked with uv against the real index for the GPU
box's probe file (Python 3.12, its torch 2.11 stack kept as it is), and, where this machine cannot
build the extension for that box, refused before a single wheel is downloaded, saying what to get."""

import json
from pathlib import Path

import pytest

from bundler import bundle, spec
from bundler.engines import exllama
from bundler import boxlock
from bundler.engines.exllama import build as exllama_build
from bundler.errors import BundlerError
from bundler.probe import Hardware
from tests.conftest import ROOT

pytestmark = pytest.mark.network


@pytest.mark.parametrize("gen", [exllama.V2, exllama.V3], ids=lambda g: g.name)
def test_exllama_is_locked_for_the_box_and_refused_where_its_extension_cannot_be_built(
        gen, write_spec, isolated_cache, tmp_path, monkeypatch):
    box = Hardware.from_dict(json.loads((ROOT / "tests/data/boxes/device-h200x2-probe.json").read_text()))
    monkeypatch.setenv("AIRGAP_LLM_WHEELS", str(tmp_path / "wheels"))
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "no-pyenv"))  # no Python 3.12 on this machine, then
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    s = spec.load(write_spec(f'[bundle]\nname = "x"\n[[models]]\nsource = "hf://o/r@4.0bpw"\nformat = "{gen.fmt}"\n'))
    said: list[str] = []
    stage = tmp_path / "stage"
    with pytest.raises(BundlerError) as e:
        exllama_build.bundle_gen(bundle.BuildContext(s, stage, box, True, said.append), gen)
    assert "no python3.12" in e.value.message and "nothing was downloaded" in e.value.message, e.value.message
    assert "pyenv install 3.12" in e.value.hint
    # the lock was made for the box: exllamav2 and TabbyAPI's dependencies, the box's torch reused
    lock_line = next(x for x in said if "lock:" in x)
    assert f"{gen.name}=={gen.version} + TabbyAPI lock" in lock_line and "already on the box" in lock_line
    assert any("keeping the box's torch 2.11.0 stack" in x for x in said)
    assert not (tmp_path / "wheels").exists() or not any(Path(tmp_path / "wheels").rglob("*.whl"))
    # TabbyAPI's files were taken from the pinned archive into the bundle's engine folder
    assert (stage / "engines" / gen.name / "tabbyapi" / "main.py").is_file()
    backends = {p.name for p in (stage / "engines" / gen.name / "tabbyapi" / "backends").iterdir()}
    assert gen.name in backends  # exl2-checkpoint for ExLlamaV2, main for ExLlamaV3


def test_the_bundle_requires_of_the_box_only_the_gpu_stack_packages_its_lock_reuses(tmp_path):
    box = Hardware.from_dict(json.loads((ROOT / "tests/data/boxes/device-h200x2-probe.json").read_text()))
    files = exllama_build.read_archive(exllama.V2.tabby_archive, exllama.V2.tabby_sha256, exllama.V2)
    reqs = exllama_build.requirements(files, "0.3.2", exllama.V2)
    carry, summary = boxlock.lock_requirements(reqs, box, tmp_path, "x", log=lambda *_: None)
    reuses = summary["reuses"]
    assert reuses["torch"] == "2.11.0" and "exllamav2" in carry
    # the box has them, but neither exllamav2 nor TabbyAPI imports them: the installer must not refuse a
    # box whose torch-geometric or torchvision moved (it did, listing every torch* package of the probe)
    assert not {"torch-geometric", "torchmetrics", "torchvision", "torchaudio", "nvidia-ml-py"} & set(reuses)
