"""Writing files so that a reader sees the old content or the new, never half of one: one helper,
one suffix, used by the bundler and the box alike (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".incomplete"


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
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
