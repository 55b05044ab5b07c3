"""Crafted tars: only the bundle its manifest describes is ever written."""

import io
import tarfile

import pytest

from bundler import manifest, safetar
from tests.conftest import small_bundle


@pytest.fixture
def bundle(tmp_path):
    return small_bundle(tmp_path / "src")


def make_tar(bundle, path, extra=None, mutate=None):
    with tarfile.open(path, "w") as tf:
        tf.add(bundle, arcname="b")
        if extra:
            extra(tf)
    if mutate:
        mutate(path)
    return path


def _file(name, data=b"x"):
    def add(tf):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return add


def _special(name, kind, target=""):
    def add(tf):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        tf.addfile(info)
    return add


def test_a_good_tar_checks_and_unpacks(bundle, tmp_path):
    tar = make_tar(bundle, tmp_path / "b.tar")
    assert safetar.check(tar) == []
    dest = tmp_path / "out"
    dest.mkdir()
    assert safetar.check(tar, dest) == []
    assert (dest / "b" / "models" / "m.gguf").read_bytes() == (bundle / "models" / "m.gguf").read_bytes()
    assert (dest / "b" / "install.sh").stat().st_mode & 0o111
    _, problems = manifest.verify(dest / "b", show_progress=False)
    assert problems == []


@pytest.mark.parametrize("extra, says", [
    (_file("b/../evil.sh"), "'..' in the path"),
    (_file("/etc/evil"), "absolute path"),
    (_special("b/link", tarfile.SYMTYPE, "/etc/passwd"), "a symlink"),
    (_special("b/hard", tarfile.LNKTYPE, "/etc/shadow"), "a hard link"),
    (_special("b/dev", tarfile.CHRTYPE), "device or special file"),
    (_special("b/fifo", tarfile.FIFOTYPE), "device or special file"),
    (_file("b/models/extra.bin"), "not in the manifest"),
    (_file("other/x"), "expected one top directory"),
])
def test_crafted_members_are_refused_and_nothing_is_written(bundle, tmp_path, extra, says):
    tar = make_tar(bundle, tmp_path / "b.tar", extra=extra)
    dest = tmp_path / "out"
    dest.mkdir()
    problems = safetar.check(tar, dest)
    assert any(says in p for p in problems), problems
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.sh").exists()


def test_a_changed_member_is_named_with_both_hashes(bundle, tmp_path):
    good = manifest.sha256_file(bundle / "models" / "m.gguf")
    model = bundle / "models" / "m.gguf"
    model.write_bytes(b"GGUX" + model.read_bytes()[4:])  # same size, changed after the manifest
    tar = make_tar(bundle, tmp_path / "b.tar")
    problems = safetar.check(tar)
    assert problems == [f"b/models/m.gguf: sha256 mismatch: expected {good}, got "
                        f"{manifest.sha256_file(bundle / 'models' / 'm.gguf')}"]


def test_the_unpack_script_runs_alone(bundle, tmp_path):
    import subprocess
    import sys

    tar = make_tar(bundle, tmp_path / "b.tar")
    script = tmp_path / "b.unpack.py"
    from bundler.bundle import unpacker

    script.write_text(unpacker("b"))
    dest = tmp_path / "box"
    dest.mkdir()
    r = subprocess.run([sys.executable, "-I", str(script), str(tar), str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (dest / "b" / "manifest.json").is_file()
