"""Writing files so that a reader sees the old content or the new, never half of one: one helper,
one suffix, used by the bundler and the box alike (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SUFFIX = ".incomplete"


def _fsync_dir(folder: Path) -> None:
    """A rename inside `folder` survives a power cut once the folder itself is synced."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temporary file beside `path` (same folder, so the rename is atomic),
    fsync it, rename it over `path`, then fsync the folder so the rename survives a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_symlink(target: str | Path, path: Path | str) -> None:
    """Point the link `path` at `target` in one step (a new link beside it, renamed over it), durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{SUFFIX}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def copy_hashing(src: Path | str, dst: Path | str, on_block: Any = None) -> str:
    """Copy src to a new dst (O_EXCL, no link followed on either side) and return the sha256 of the bytes
    written: what is hashed is what was copied, so the copy is what gets used. on_block(n) after each block."""
    import hashlib

    h = hashlib.sha256()
    fi = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fi, "rb") as r, os.fdopen(fo, "wb") as w:
        for block in iter(lambda: r.read(8 << 20), b""):
            h.update(block)
            w.write(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()
