import subprocess

from bundler import manifest
from tests.conftest import small_bundle as _bundle


def test_manifest_lists_every_file_with_size_hash_and_mode(tmp_path):
    root = _bundle(tmp_path)
    doc = manifest.load(root)
    files = {f["path"]: f for f in doc["files"]}
    assert set(files) == {"models/m.gguf", "install.sh"}
    assert files["install.sh"]["mode"] == 0o755
    assert files["models/m.gguf"]["size"] == 4 + 25600
    assert files["models/m.gguf"]["sha256"] == manifest.sha256_file(root / "models/m.gguf")


def test_sha256sum_accepts_the_sums_file(tmp_path):
    root = _bundle(tmp_path)
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "manifest.json: OK" in r.stdout


def test_verify_clean_bundle_has_no_problems(tmp_path):
    _, problems = manifest.verify(_bundle(tmp_path), show_progress=False)
    assert problems == []


def test_verify_reports_every_problem_naming_file_and_hashes(tmp_path):
    root = _bundle(tmp_path)
    model = root / "models/m.gguf"
    good = manifest.sha256_file(model)
    data = bytearray(model.read_bytes())
    data[1000] ^= 0x01
    model.write_bytes(bytes(data))
    (root / "install.sh").unlink()
    (root / "stray.txt").write_text("x")
    _, problems = manifest.verify(root, show_progress=False)
    text = "\n".join(p.describe() for p in problems)
    assert f"models/m.gguf: sha256 mismatch: expected {good}, got {manifest.sha256_file(model)}" in text
    assert "install.sh: missing" in text
    assert "stray.txt: not in the manifest" in text


def test_verify_detects_an_edited_manifest(tmp_path):
    root = _bundle(tmp_path)
    m = root / "manifest.json"
    m.write_text(m.read_text().replace('"name": "b"', '"name": "c"'))
    _, problems = manifest.verify(root, show_progress=False)
    assert [p.path for p in problems] == ["manifest.json"]


def _split_bundle(tmp_path, size=4096):
    root = _bundle(tmp_path)
    entries = manifest.split_large(root, manifest.scan(root), size, log=lambda m: None)
    manifest.write(root, {"name": "b"}, entries)
    return root


def test_large_files_are_split_into_parts_no_larger_than_the_limit(tmp_path):
    root = _split_bundle(tmp_path)
    assert not (root / "models/m.gguf").exists()
    parts = sorted((root / "models").iterdir())
    assert len(parts) == 7 and all(p.stat().st_size <= 4096 for p in parts)
    r = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    _, problems = manifest.verify(root, show_progress=False)
    assert problems == []


def test_a_missing_or_damaged_part_is_named(tmp_path):
    root = _split_bundle(tmp_path)
    (root / "models/m.gguf.part002").unlink()
    _, problems = manifest.verify(root, show_progress=False)
    assert [p.describe() for p in problems] == ["models/m.gguf.part002: missing (the manifest lists it)"]
    root2 = _split_bundle(tmp_path / "second")
    part = root2 / "models/m.gguf.part004"
    part.write_bytes(b"X" + part.read_bytes()[1:])
    _, problems = manifest.verify(root2, show_progress=False)
    assert problems[0].path == "models/m.gguf.part004" and problems[0].kind == "changed"


def test_parts_join_back_into_the_original_file(tmp_path):
    original = _bundle(tmp_path / "orig") / "models/m.gguf"
    data = original.read_bytes()
    root = _split_bundle(tmp_path)
    doc = manifest.load(root)
    (entry,) = [e for e in manifest.entries_of(doc) if e.parts]
    manifest.join_parts(root, entry)
    assert (root / "models/m.gguf").read_bytes() == data
    _, problems = manifest.verify(root, show_progress=False)
    assert problems == []  # the joined file is named by the manifest; the parts still are too


def test_huge_files_are_verified_by_chunks_and_the_bad_chunk_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CHUNKED_MIN", 10_000)
    monkeypatch.setattr(manifest, "CHUNK_SIZE", 8192)
    root = _bundle(tmp_path)  # models/m.gguf is 25,604 bytes: 4 chunks
    (e,) = [e for e in manifest.entries_of(manifest.load(root)) if e.path == "models/m.gguf"]
    assert len(e.chunks) == 4 and e.sha256 == manifest.sha256_file(root / "models/m.gguf")
    r = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0
    assert manifest.verify(root, show_progress=False)[1] == []
    data = bytearray((root / "models/m.gguf").read_bytes())
    data[2 * 8192 + 5] ^= 0x40
    (root / "models/m.gguf").write_bytes(bytes(data))
    _, problems = manifest.verify(root, show_progress=False)
    assert [p.describe().split(": expected")[0] for p in problems] == [
        "models/m.gguf: sha256 mismatch in bytes 16384-24575"]


def test_a_symlinked_folder_with_an_extra_library_is_refused(tmp_path):
    """os.walk does not enter a symlinked folder: a folder swapped for a link to one holding an
    extra lib/libm.so.6 passed unseen, then was copied into the release."""
    from tests.conftest import small_bundle

    root = small_bundle(tmp_path)
    evil = tmp_path / "evil"
    (evil / "lib").mkdir(parents=True)
    (evil / "lib" / "libm.so.6").write_bytes(b"\x7fELF planted")
    (root / "engines").symlink_to(evil, target_is_directory=True)
    _, problems = manifest.verify(root, show_progress=False)
    assert [(p.path, p.kind) for p in problems] == [("engines", "symlink")]
    assert "a symbolic link" in problems[0].describe()


def test_a_manifest_naming_a_path_outside_or_a_setuid_mode_is_refused_before_anything_is_read(tmp_path):
    import json

    from tests.conftest import small_bundle

    root = small_bundle(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root-only")
    doc = json.loads((root / "manifest.json").read_text())
    doc["files"].append({"path": "../secret", "size": 9, "sha256": "0" * 64, "mode": 0o644})
    doc["files"].append({"path": "models/x.sh", "size": 9, "sha256": "0" * 64, "mode": 0o4755,
                         "parts": [{"path": "../outside.sh.part000", "size": 9, "sha256": "0" * 64}]})
    (root / "manifest.json").write_text(json.dumps(doc))
    _, problems = manifest.verify(root, show_progress=False)
    kinds = {(p.path, p.kind) for p in problems}
    assert {("../secret", "unsafe"), ("../outside.sh.part000", "unsafe"), ("models/x.sh", "mode")} <= kinds
    assert not any(p.kind in ("changed", "size") and p.path == "../secret" for p in problems)  # never hashed
    assert not (tmp_path / "outside.sh").exists()
    assert not manifest.safe_relpath("a/./b") and not manifest.safe_relpath("/etc/passwd")
    assert manifest.safe_relpath("engines/llama.cpp-cpu/bin/llama-server")
