"""Delta bundles: a version bump with the model unchanged carries only what the base lacks; on the box,
install.sh --base OLD takes the rest from the old bundle's folder, each file checked against the new
signed manifest, and upgrades the running service. Without the base, or with another one, it refuses
before anything changes, naming what it needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import GEMMA

pytestmark = pytest.mark.e2e
NAME = "gemma3-270m-cpu"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def delta_dist(bundle_dir, tmp_path_factory):
    """The same spec one version on, bundled over the session's bundle (1.0.0)."""
    d = tmp_path_factory.mktemp("delta")
    spec = d / "spec.toml"
    spec.write_text(GEMMA.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(spec), "--out", str(d / "dist"),
                        "--base", str(bundle_dir)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "delta over gemma3-270m-cpu 1.0.0: carries" in r.stderr and "--base" in r.stdout
    return d / "dist"


def test_a_version_bump_carries_a_tenth_of_the_full_bundle_at_most(bundle_dir, delta_dist):
    full, delta = _size(bundle_dir), _size(delta_dist / NAME)
    print(f"\ndelta {delta / 2**20:.1f} MiB of full {full / 2**20:.1f} MiB: {delta / full:.3f}")
    assert delta <= 0.10 * full
    doc = json.loads((delta_dist / NAME / "manifest.json").read_text())
    base = doc["delta"]["base"]
    assert base["name"] == NAME and base["version"] == "1.0.0"
    assert any(p.startswith("models/") for p in doc["delta"]["from_base"])  # the unchanged model stays behind
    assert not any((delta_dist / NAME / p).exists() for p in doc["delta"]["from_base"])
    # what bootstrap.py needs before the installer can read any base travels always
    assert (delta_dist / NAME / "install.sh").is_file() and list((delta_dist / NAME / "wheels").glob("airgap_llm-*"))
    # bundler verify checks what it carries and says what it leaves to the base
    v = subprocess.run([sys.executable, "-m", "bundler.cli", "verify", str(delta_dist / NAME), "--trust",
                        os.environ["AIRGAP_LLM_TRUST"]], capture_output=True, text=True)
    assert v.returncode == 0 and "a delta over gemma3-270m-cpu 1.0.0" in v.stdout, v.stdout + v.stderr


def test_the_delta_installs_over_the_old_release_from_the_base_and_refuses_without_it(bundle_dir, delta_dist, netns,
                                                                                    tmp_path):
    prefix = tmp_path / "p"
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18150", "--json"])
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    try:
        # the delta travels as its tar and the unpacker beside it: the files left to the base are not in the tar
        box = tmp_path / "box"
        box.mkdir()
        u = subprocess.run([sys.executable, "-I", str(delta_dist / f"{NAME}.unpack.py"), "--trust",
                            os.environ["AIRGAP_LLM_TRUST"], str(delta_dist / f"{NAME}.tar"), str(box)],
                           capture_output=True, text=True)
        assert u.returncode == 0, u.stdout + u.stderr
        new = box / NAME
        cmd = [str(new / "install.sh"), "--prefix", str(prefix), "--port", "18150", "--json"]
        # without its base: refused at once, naming the base and what to pass; the service is untouched
        r = netns.run(cmd)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "a delta bundle over gemma3-270m-cpu 1.0.0" in r.stderr and "--base" in r.stderr, r.stderr
        # another bundle as the base: refused, naming the one it needs
        r = netns.run([*cmd, "--base", str(new)])
        assert r.returncode == 1 and "not the bundle this delta was made over" in r.stderr, r.stderr
        assert json.loads(netns.run([str(new / "install.sh"), "--prefix", str(prefix), "--list", "--json"]).stdout)
        # with it: the files come from the old bundle's folder, checked, and the service is upgraded
        r = netns.run([*cmd, "--base", str(bundle_dir)])
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert "delta over gemma3-270m-cpu 1.0.0" in r.stderr and "Thursday" in out["answer"]
        assert out["release"] != first["release"]
        listed = netns.run([str(new / "install.sh"), "--prefix", str(prefix), "--list", "--json"])
        assert "1.0.1" in listed.stdout, listed.stdout
    finally:
        subprocess.run([first["ctl"], "stop"], capture_output=True)


def test_a_base_file_that_is_not_what_the_delta_pins_is_refused(bundle_dir, delta_dist, tmp_path):
    """The base is read as root from wherever it lies: its bytes count only if they hash to what the
    delta's signed manifest pins."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(bundle_dir, base, copy_function=os.link)
    doc = json.loads((delta_dist / NAME / "manifest.json").read_text())
    victim = next(p for p in doc["delta"]["from_base"] if p.startswith("engines/"))
    target = base / victim
    data = bytearray(target.read_bytes())
    target.unlink()
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    new = tmp_path / NAME
    shutil.copytree(delta_dist / NAME, new)
    r = subprocess.run([str(new / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run", "--base", str(base)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"{victim} is not what this bundle's manifest pins" in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_a_dry_run_checks_the_base_where_it_lies_and_writes_nothing(bundle_dir, delta_dist, tmp_path):
    import shutil

    new = tmp_path / NAME
    shutil.copytree(delta_dist / NAME, new)
    before = sorted(p.relative_to(new) for p in new.rglob("*"))
    r = subprocess.run([str(new / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run", "--base",
                        str(bundle_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing copied" in r.stderr
    assert sorted(p.relative_to(new) for p in new.rglob("*")) == before
    assert not (tmp_path / "p").exists()


def test_a_base_file_that_is_not_a_regular_file_of_its_size_is_refused_without_reading_it(bundle_dir, delta_dist,
                                                                                      tmp_path):
    """The base may belong to anyone: a FIFO (which would hang a reader) or a file larger than pinned (which
    would fill the disk before its hash is known) is refused on sight."""
    import shutil

    doc = json.loads((delta_dist / NAME / "manifest.json").read_text())
    victim = next(p for p in doc["delta"]["from_base"] if p.startswith("models/"))
    for kind in ("fifo", "larger"):
        base = tmp_path / kind
        shutil.copytree(bundle_dir, base, copy_function=os.link)
        (base / victim).unlink()
        if kind == "fifo":
            os.mkfifo(base / victim)
        else:
            with open(base / victim, "wb") as f:
                f.truncate(64 << 30)  # sparse: 64 GiB where a few hundred MiB are pinned
        new = tmp_path / f"new-{kind}" / NAME
        shutil.copytree(delta_dist / NAME, new)
        r = subprocess.run([str(new / "install.sh"), "--prefix", str(tmp_path / "p"), "--base", str(base)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"{victim} is not the regular file of" in r.stderr, r.stderr
        assert not (new / victim).exists() and not list(new.rglob("*.incomplete"))
