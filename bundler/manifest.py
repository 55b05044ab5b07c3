"""Manifest: every file of a bundle with its size and sha256, plus SHA256SUMS.

Runs on both sides (bundle and box), so it uses the standard library only
(tqdm when importable). sha256 everywhere: it matches pip --hash, Hugging Face
LFS oids and coreutils' sha256sum.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from collections.abc import Iterable

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
SIGNATURE = "manifest.json.minisig"  # signs the manifest, so it cannot be listed in it
CHUNK = 4 << 20
# Files over CHUNKED_MIN also get the sha256 of each CHUNK_SIZE piece in the manifest, so
# one huge file is verified on every core at once (its whole-file sha256 stays, for
# sha256sum, pip and the hubs).
CHUNKED_MIN = 1 << 30
CHUNK_SIZE = 256 << 20


@dataclass(frozen=True)
class Part:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative, '/'-separated
    size: int
    sha256: str
    mode: int = 0o644
    parts: tuple[Part, ...] = ()  # when split for a size-limited transfer: the file is these, in order
    chunks: tuple[str, ...] = ()  # sha256 of each CHUNK_SIZE piece, for files over CHUNKED_MIN

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.parts:
            d.pop("parts")
        else:
            d["parts"] = [asdict(p) for p in self.parts]
        if not self.chunks:
            d.pop("chunks")
        else:
            d["chunks"] = list(self.chunks)
            d["chunk_size"] = CHUNK_SIZE
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestEntry:
        d = dict(d)
        d["parts"] = tuple(Part(**p) for p in d.get("parts", ()))
        d["chunks"] = tuple(d.get("chunks", ()))
        if d.pop("chunk_size", CHUNK_SIZE) != CHUNK_SIZE:
            d["chunks"] = ()  # another chunk size: fall back to the whole-file hash
        return cls(**d)


@dataclass(frozen=True)
class Problem:
    path: str
    kind: str  # "changed" | "missing" | "size" | "extra" | "unreadable"
    expected: str = ""
    actual: str = ""

    def describe(self) -> str:
        if self.kind == "changed":
            return f"{self.path}: sha256 mismatch: expected {self.expected}, got {self.actual}"
        if self.kind == "size":
            return f"{self.path}: size mismatch: expected {self.expected} bytes, got {self.actual}"
        if self.kind == "missing":
            return f"{self.path}: missing (the manifest lists it)"
        if self.kind == "extra":
            return f"{self.path}: not in the manifest"
        if self.kind == "sums":
            return f"{self.path}: not the lines the manifest implies (changed after it was written)"
        if self.kind == "symlink":
            return f"{self.path}: a symbolic link (a bundle holds only regular files and folders)"
        if self.kind == "special":
            return f"{self.path}: not a regular file or folder"
        if self.kind == "unsafe":
            return f"{self.path}: the manifest names a path that is not plain and relative inside the bundle"
        if self.kind == "mode":
            return f"{self.path}: the manifest asks for mode {self.actual}; only 644 and 755 are allowed"
        if self.kind == "chunk":
            exp, got = self.actual.split(" / ")
            return f"{self.path}: sha256 mismatch in {self.expected}: expected {exp}, got {got}"
        return f"{self.path}: {self.kind}: {self.actual}"


def sha256_file(path: str | os.PathLike[str], progress: Callable[[int], Any] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def _blocks(f, limit: int):
    """Blocks of f from where it stands, `limit` bytes at most."""
    left = limit
    while left:
        block = f.read(min(CHUNK, left))
        if not block:
            return
        left -= len(block)
        yield block


def _walk(root: Path) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath, fn)
            rel = p.relative_to(root).as_posix()
            if rel in (MANIFEST, SUMS, SIGNATURE):
                continue
            yield rel


def scan(root: Path, workers: int | None = None) -> list[ManifestEntry]:
    """Hash every file under root (except the manifest and SHA256SUMS themselves)."""
    rels = list(_walk(root))

    def one(rel: str) -> ManifestEntry:
        p = root / rel
        st = p.stat()
        mode = 0o755 if st.st_mode & 0o111 else 0o644
        if st.st_size <= CHUNKED_MIN:
            return ManifestEntry(rel, st.st_size, sha256_file(p), mode)
        whole, chunks = hashlib.sha256(), []
        with open(p, "rb") as f:  # one pass: the whole file and its chunks
            while True:
                piece, n = hashlib.sha256(), 0
                for block in _blocks(f, CHUNK_SIZE):
                    whole.update(block)
                    piece.update(block)
                    n += len(block)
                if not n:
                    break
                chunks.append(piece.hexdigest())
        return ManifestEntry(rel, st.st_size, whole.hexdigest(), mode, chunks=tuple(chunks))

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as ex:
        return list(ex.map(one, rels))


def write(root: Path, meta: dict[str, Any], entries: list[ManifestEntry]) -> Path:
    """Write manifest.json (meta + files) and SHA256SUMS (files + manifest.json)."""
    doc = dict(meta)
    doc["files"] = [e.to_dict() for e in entries]
    mpath = root / MANIFEST
    from .files import atomic_write  # the box imports this module from its checked copies too

    atomic_write(mpath, (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode())
    (root / SUMS).write_text(_sums_text(entries, sha256_file(mpath)))
    return mpath


def _sums_text(entries: list[ManifestEntry], manifest_sha256: str) -> str:
    """SHA256SUMS as write() makes it: what is on disk (the parts of a split file, not the file)."""
    lines = []
    for e in entries:
        lines += [f"{p.sha256}  {p.path}\n" for p in e.parts] if e.parts else [f"{e.sha256}  {e.path}\n"]
    lines.append(f"{manifest_sha256}  {MANIFEST}\n")
    return "".join(lines)


def parse(data: bytes, root: Path) -> dict[str, Any]:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        from .errors import VerifyError

        raise VerifyError(f"{root / MANIFEST}: damaged manifest ({e})", hint="copy the bundle again from its source")


def read_bytes(root: Path) -> bytes:
    """manifest.json's bytes, read once (not through a link)."""
    try:
        fd = os.open(root / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        from .errors import VerifyError

        raise VerifyError(f"{root / MANIFEST}: no manifest here", hint="run this from an unpacked bundle directory")
    except OSError as e:
        from .errors import VerifyError

        raise VerifyError(f"{root / MANIFEST}: cannot be read ({e.strerror})", hint="copy the bundle again")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def load(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    try:
        return json.loads(mpath.read_text())
    except FileNotFoundError:
        from .errors import VerifyError

        raise VerifyError(f"{mpath}: no manifest here", hint="run this from an unpacked bundle directory")
    except (ValueError, UnicodeDecodeError) as e:
        from .errors import VerifyError

        raise VerifyError(f"{mpath}: damaged manifest ({e})", hint="copy the bundle again from its source")


def entries_of(doc: dict[str, Any]) -> list[ManifestEntry]:
    try:
        return [ManifestEntry.from_dict(f) for f in doc["files"]]
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        from .errors import VerifyError

        raise VerifyError(f"{MANIFEST}: damaged manifest (an entry does not read: {e})",
                          hint="copy the bundle again from its source")


def split_large(root: Path, entries: list[ManifestEntry], part_size: int, log=print) -> list[ManifestEntry]:
    """Replace every file larger than part_size by FILE.partNNN files of at most part_size."""
    out = []
    for e in entries:
        if e.size <= part_size:
            out.append(e)
            continue
        src = root / e.path
        parts = []
        with open(src, "rb") as f:
            i = 0
            while True:
                block = f.read(part_size)
                if not block:
                    break
                rel = f"{e.path}.part{i:03d}"
                (root / rel).write_bytes(block)
                parts.append(Part(rel, len(block), hashlib.sha256(block).hexdigest()))
                i += 1
        src.unlink()
        log(f"split {e.path} into {len(parts)} parts")
        out.append(ManifestEntry(e.path, e.size, e.sha256, e.mode, tuple(parts)))
    return out


def join_parts(root: Path, e: ManifestEntry) -> None:
    """Reassemble a split file (its parts already verified) and check the whole."""
    from .errors import VerifyError

    dest = root / e.path
    tmp = dest.with_name(dest.name + ".joining")
    h = hashlib.sha256()
    if os.path.lexists(tmp):  # a left-over of a killed join, or something planted: never written through
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        for p in e.parts:
            with open(root / p.path, "rb") as f:
                while True:
                    block = f.read(CHUNK)
                    if not block:
                        break
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != e.sha256:
        tmp.unlink()
        raise VerifyError(f"{e.path}: its parts join to sha256 {h.hexdigest()}, expected {e.sha256}",
                          hint="the manifest and the parts disagree: copy the bundle again")
    os.chmod(tmp, e.mode)
    os.replace(tmp, dest)


def _sums_manifest_hash(root: Path) -> str | None:
    try:
        for line in (root / SUMS).read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name == MANIFEST:
                return digest
    except FileNotFoundError:
        return None
    return None


ALLOWED_MODES = (0o644, 0o755)


def safe_relpath(rel: str) -> bool:
    """A plain relative path that stays inside its root: no '..', '.', empty parts, absolute or
    backslash paths, no control characters."""
    if not rel or rel.startswith("/") or "\\" in rel or any(ord(c) < 32 for c in rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _entry_problems(entries: list[ManifestEntry]) -> list[Problem]:
    out = []
    for e in entries:
        for rel in (e.path, *(p.path for p in e.parts)):
            if not safe_relpath(rel) or rel in (MANIFEST, SUMS, SIGNATURE):
                out.append(Problem(rel, "unsafe"))
        if e.mode not in ALLOWED_MODES:
            out.append(Problem(e.path, "mode", actual=f"{e.mode:o}"))
    return out


def _odd_files(root: Path) -> list[Problem]:
    """Symbolic links (to files or folders, at any depth) and anything not a regular file."""
    import stat

    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                out.append(Problem(rel, "symlink"))
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                out.append(Problem(rel, "special"))
    return out


def verify(root: Path, workers: int | None = None, show_progress: bool = True,
           data: bytes | None = None) -> tuple[dict[str, Any], list[Problem]]:
    """Check every file the manifest names; report all problems, not only the first. Nothing
    outside the bundle is read: unsafe manifest paths and links are problems, not followed.
    `data`: the manifest's bytes as the caller read them (once), else read here."""
    problems: list[Problem] = _odd_files(root)
    if any(p.path in (MANIFEST, SUMS, SIGNATURE) for p in problems):
        return {}, problems
    expected_m = _sums_manifest_hash(root)
    if expected_m is None:
        problems.append(Problem(SUMS, "missing"))
    else:
        if data is not None:
            actual_m = hashlib.sha256(data).hexdigest()
        else:
            actual_m = sha256_file(root / MANIFEST) if (root / MANIFEST).exists() else ""
        if actual_m and actual_m != expected_m:
            problems.append(Problem(MANIFEST, "changed", expected_m, actual_m))
    doc = load(root) if data is None else parse(data, root)
    entries = entries_of(doc)
    unsafe = _entry_problems(entries)
    if unsafe or problems:  # read nothing a crafted manifest points at, through links or '..'
        return doc, problems + unsafe
    total = sum(e.size for e in entries)
    bar = _progress(total, "verify", show_progress)

    def one(e: ManifestEntry) -> Problem | None:
        if e.parts and not _whole_ok(root, e):
            for part in e.parts:
                bad = one(ManifestEntry(part.path, part.size, part.sha256))
                if bad:
                    return bad
            return None
        p = root / e.path
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            bar(e.size)
            return Problem(e.path, "missing")
        if size != e.size:
            bar(e.size)
            return Problem(e.path, "size", str(e.size), str(size))
        if e.chunks:
            return None  # its chunks are hashed as tasks of their own, on every core
        try:
            digest = sha256_file(p, bar)
        except OSError as err:
            return Problem(e.path, "unreadable", actual=str(err))
        if digest != e.sha256:
            return Problem(e.path, "changed", e.sha256, digest)
        return None

    def chunk(task: tuple[ManifestEntry, int]) -> Problem | None:
        e, i = task
        h = hashlib.sha256()
        try:
            with open(root / e.path, "rb") as f:
                f.seek(i * CHUNK_SIZE)
                for block in _blocks(f, CHUNK_SIZE):
                    h.update(block)
                    bar(len(block))
        except OSError as err:
            return Problem(e.path, "unreadable", actual=str(err))
        if h.hexdigest() != e.chunks[i]:
            start = i * CHUNK_SIZE
            return Problem(e.path, "chunk", f"bytes {start}-{min(start + CHUNK_SIZE, e.size) - 1}",
                           f"{e.chunks[i]} / {h.hexdigest()}")
        return None

    chunk_tasks = [(e, i) for e in entries if e.chunks and _whole_ok(root, e) for i in range(len(e.chunks))]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as ex:
        problems += [p for p in ex.map(one, entries) if p]
        found = [p for p in ex.map(chunk, chunk_tasks) if p]
    seen_chunk: set[str] = set()
    for p in found:  # one line per file, naming its first bad chunk
        if p.path not in seen_chunk:
            seen_chunk.add(p.path)
            problems.append(p)
    bar(None)
    if expected_m is not None and (root / SUMS).read_bytes() != _sums_text(entries, expected_m).encode():
        problems.append(Problem(SUMS, "sums"))
    named = {e.path for e in entries} | {p.path for e in entries for p in e.parts}
    problems += [Problem(rel, "extra") for rel in _walk(root) if rel not in named]
    return doc, problems


def _whole_ok(root: Path, e: ManifestEntry) -> bool:
    """A split file already joined (a second install from the same directory)."""
    p = root / e.path
    return p.is_file() and p.stat().st_size == e.size


def _progress(total: int, desc: str, show: bool) -> Callable[[int | None], None]:
    """A thread-safe byte counter; tqdm where it can be imported, silence otherwise."""
    if not show:
        return lambda n: None
    try:
        from .progress import bar
    except ImportError:  # pragma: no cover - progress.py is beside this file
        return lambda n: None
    import threading

    t = bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=True, mininterval=0.3)
    lock = threading.Lock()

    def update(n: int | None) -> None:
        with lock:
            if n is None:
                t.close()
            else:
                t.update(n)

    return update
