"""The real pip-compile and pip download against the package index."""

import zipfile

import pytest

from bundler import lock
from tests.conftest import ROOT

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def box_lock(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock")
    out = d / "box.lock"
    pins = lock.compile_lock(lock.runtime_requirements(), out)
    return out, dict(pins)


def test_lock_pins_every_runtime_dependency_with_hashes(box_lock):
    out, pins = box_lock
    assert {"jinja2", "markupsafe", "tqdm", "installer"} <= set(pins)
    assert pins["installer"].startswith("0.7")  # installer 1.x dropped Python 3.9
    text = out.read_text()
    for name in ("jinja2", "markupsafe", "tqdm", "installer"):
        block = text.split(f"{name}==", 1)[1].split("\n\n", 1)[0]
        assert "--hash=sha256:" in block


def test_download_fetches_binary_wheels_for_each_python(box_lock, tmp_path):
    out, pins = box_lock
    got39 = lock.download(out, tmp_path, python="3.9")
    got313 = lock.download(out, tmp_path, python="3.13")
    names = {p.name for p in got39 + got313}
    assert any("cp39" in n and n.startswith("markupsafe") for n in names)
    assert any("cp313" in n and n.startswith("markupsafe") for n in names)
    assert all(zipfile.is_zipfile(p) for p in got39 + got313)


def test_install_lock_is_written_from_the_files_present(box_lock, tmp_path):
    out, _ = box_lock
    wheels = tmp_path / "w"
    lock.download(out, wheels, python="3.11")
    own = lock.build_own_wheel(wheels)
    again = lock.build_own_wheel(tmp_path / "w2")
    assert own.read_bytes() == again.read_bytes(), "the same source must give the same wheel"
    req = tmp_path / "requirements.lock"
    names = lock.write_install_lock(wheels, req)
    assert "airgap-llm" in names
    from bundler.manifest import sha256_file

    assert f"--hash=sha256:{sha256_file(own)}" in req.read_text()


def test_a_missing_package_fails_with_what_was_asked(tmp_path):
    from bundler.errors import BundlerError

    with pytest.raises(BundlerError) as e:
        lock.compile_lock(["airgap-llm-no-such-package-xyz==9.9"], tmp_path / "x.lock")
    assert "airgap-llm-no-such-package-xyz" in e.value.message
    assert "reachable" in e.value.hint


def test_the_newest_vllm_is_locked_for_the_gpu_box_with_the_torch_it_needs(tmp_path):
    """[engines.vllm] version = "latest" against the GPU box's probe (Python 3.12, torch 2.11.0): the newest
    vLLM on the index, which pins a newer torch than the box has, so its own torch stack is carried."""
    import json

    from bundler import probe
    from bundler.engines.vllm.build import lock_latest
    from bundler.versions import version_tuple

    box = probe.Hardware.from_dict(json.loads((ROOT / "tests/data/boxes/device-h200x2-probe.json").read_text()))
    said = []
    version, carry, summary, why = lock_latest(box, tmp_path, log=said.append)
    # 0.33.0 when this was written: 0.34.0 is listed, but pins a flashinfer-python the index does not have
    assert version_tuple(version) >= (0, 33), version
    assert carry["vllm"][0] == version
    assert version_tuple(carry["torch"][0]) > (2, 11), carry["torch"]  # not the box's 2.11.0
    assert "torch" not in summary["reuses"] and "triton" not in summary["reuses"]
    # of the box's stack, only what the new torch needs at the very version the box has is reused (and
    # checked at install); the rest, its cuBLAS, cuDNN and NCCL among them, is carried
    box_has = {k.lower(): v for k, v in box.installed.items()}
    assert summary["reuses"] and all(box_has[k.lower()] == v for k, v in summary["reuses"].items())
    assert not set(summary["reuses"]) & set(carry)
    assert {"nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= set(carry), sorted(carry)
    assert f"vLLM {version}, the newest that resolved on the index" in why and "its own torch stack is carried" in why
    assert why in said


def test_the_newest_vllm_is_refused_for_a_driver_older_than_its_cuda(tmp_path):
    import json

    from bundler import probe
    from bundler.engines.vllm.build import lock_latest
    from bundler.errors import BundlerError

    d = json.loads((ROOT / "tests/data/boxes/device-h200x2-probe.json").read_text())
    for g in d["gpus"]:
        g["driver"] = "550.54.15"
    with pytest.raises(BundlerError, match="driver 550.54.15 is older than 580"):
        lock_latest(probe.Hardware.from_dict(d), tmp_path, log=lambda *_: None)
