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


def test_one_normalisation_for_the_check_and_the_write(bundle, tmp_path):
    """The top-folder check read 'b//x' as b/x while the write joined '/x' onto the folder: a file
    landed outside it. A manifest naming an absolute path made the folder walk loop forever."""
    import json

    for name in ("b//evil", "./b/evil", "b/./evil", "b/evil/", "b\\\\evil"):
        def add(tf, name=name):
            _file(name)(tf)
        tar = make_tar(bundle, tmp_path / "t.tar", extra=add)
        assert safetar.check(tar, tmp_path) != []
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["files"].append({"path": "/abs/evil", "size": 1, "sha256": "0" * 64})
    (bundle / "manifest.json").write_text(json.dumps(doc))
    import signal

    def timeout(*_):
        raise TimeoutError("the check did not end")

    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    try:
        problems = safetar.check(make_tar(bundle, tmp_path / "abs.tar"), tmp_path)
    finally:
        signal.alarm(0)
    assert any("'/abs/evil': refused: absolute path" in p for p in problems), problems


def test_fuzzed_member_names_and_manifest_paths_never_write_outside_and_always_end(tmp_path):
    """Random names from the characters that matter ('/', '.', '..', '\\\\', NUL, spaces), as tar members
    and as manifest paths: every run ends (within seconds), and nothing lands outside DEST/TOP."""
    import hashlib
    import json
    import random
    import signal

    rng = random.Random(20261207)
    atoms = ["b", "x", ".", "..", "", "/", "//", "\\\\", "\x00", " ", "é", "models", "manifest.json", "a" * 300]

    def name():
        return "/".join(rng.choice(atoms) for _ in range(rng.randint(1, 5)))

    def timeout(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, timeout)
    for trial in range(300):
        box = tmp_path / f"t{trial}"
        dest = box / "dest"
        dest.mkdir(parents=True)
        body = b"data"
        files = [{"path": name() if rng.random() < 0.5 else "models/m", "size": 4,
                  "sha256": hashlib.sha256(body).hexdigest()} for _ in range(rng.randint(1, 3))]
        man = json.dumps({"name": "b", "files": files}).encode()
        sums = f"{hashlib.sha256(man).hexdigest()}  manifest.json\n".encode()
        tar = box / "t.tar"
        with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
            for n, data in [("b/manifest.json", man), ("b/SHA256SUMS", sums)] + [
                    (rng.choice(["b/", ""]) + name(), body) for _ in range(rng.randint(1, 4))]:
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        signal.alarm(10)
        try:
            problems = safetar.check(tar, dest)
        finally:
            signal.alarm(0)
        top = dest / "b"
        outside = sorted(str(p) for p in box.rglob("*") if p not in (tar, dest, top) and top not in p.parents)
        assert outside == [], (trial, problems)
        if problems:
            assert list(dest.iterdir()) == [], trial  # nothing written on any doubt


def test_a_truncated_tar_is_named_without_a_traceback(bundle, tmp_path):
    """The likeliest failure when carrying a bundle: the unpacker and `bundler verify`/`unpack`
    answered a cut tar with a traceback."""
    import subprocess
    import sys

    from bundler.bundle import unpacker

    tar = make_tar(bundle, tmp_path / "b.tar")
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    problems = safetar.check(tar, tmp_path)
    assert len(problems) == 1 and "truncated" in problems[0] and not (tmp_path / "b").exists()
    script = tmp_path / "b.unpack.py"
    script.write_text(unpacker("b"))
    dest = tmp_path / "out"
    dest.mkdir()
    for cmd in ([sys.executable, "-I", str(script), str(tar), str(dest)],
                [sys.executable, "-m", "bundler.cli", "unpack", str(tar), str(dest)],
                [sys.executable, "-m", "bundler.cli", "verify", str(tar)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
    assert list(dest.iterdir()) == []


def test_a_member_that_changes_between_its_check_and_its_extraction_is_not_written(bundle, tmp_path, monkeypatch):
    """The tar is read twice (check, then write): a share that answers the second read differently
    got unchecked bytes written, and "unpacked and verified" said."""
    tar = make_tar(bundle, tmp_path / "b.tar")
    real = safetar._blocks
    seen: dict[str, int] = {}

    def second_read_lies(tf, m):
        seen[m.name] = seen.get(m.name, 0) + 1
        if m.name.endswith("m.gguf") and seen[m.name] > 1:
            yield b"X" * m.size
            return
        yield from real(tf, m)

    monkeypatch.setattr(safetar, "_blocks", second_read_lies)
    dest = tmp_path / "out"
    dest.mkdir()
    problems = safetar.check(tar, dest)
    assert len(problems) == 1 and "changed between its check and its extraction" in problems[0], problems
    assert list(dest.iterdir()) == []


def test_a_sparse_member_is_refused(bundle, tmp_path):
    def add(tf):
        info = tarfile.TarInfo("b/models/sparse.bin")
        info.type = tarfile.GNUTYPE_SPARSE
        info.size = 0
        tf.addfile(info)
    tar = make_tar(bundle, tmp_path / "s.tar", extra=add)
    problems = safetar.check(tar, tmp_path)
    assert any("sparse" in p for p in problems), problems


def test_a_tar_of_too_many_members_is_refused_before_they_are_all_read(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(safetar, "MAX_MEMBERS", 3)
    problems = safetar.check(make_tar(bundle, tmp_path / "b.tar"), tmp_path)
    assert problems == [f"{tmp_path / 'b.tar'}: more than 3 members; a bundle has far fewer: refused"]
