"""A delta bundle carries only what its base lacked (bundler bundle --base): before the bundle is
verified, the files it left to its base are copied in from the base bundle's folder (install.sh
--base DIR), each hashed while it is copied against this bundle's own signed manifest. Then the
bundle verifies as a whole, like any other. On a dry run nothing is written: each base file is
hashed where it lies, and verification takes those as present.

The base folder may belong to anyone: its manifest is read once (bounded, a regular file, no
link), each file must be a regular file of exactly the pinned size, read through one descriptor,
and nothing of it counts unless its bytes hash to what the signed manifest pins."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..contract import trust as policy
from ..errors import BundlerError
from ..files import SUFFIX
from .report import info


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fill_from_base(bundle: Path, doc: dict[str, Any], base: Path | None, write: bool = True) -> set[str]:
    """Copy (write) or check (dry run) what the delta left to its base; returns the paths checked in
    place on a dry run, which verification then takes as present."""
    delta = doc.get("delta")
    if not delta:
        if base is not None:
            info(f"--base {base}: this bundle carries every file itself; the base is not read")
        return set()
    entries = {e.path: e for e in mf.entries_of(doc)}
    if mf._entry_problems(list(entries.values())) or mf._odd_files(bundle):
        return set()  # unsafe paths or links: verification names them; nothing is written before it
    b = delta["base"]
    need = [entries[p] for p in delta["from_base"] if not _present(bundle, entries[p])]
    if not need:
        return set()
    what = f"{b['name']} {b['version']} (manifest sha256 {b['manifest_sha256'][:16]}…)"
    if base is None:
        raise BundlerError(f"this is a delta bundle over {what}: it does not carry {len(need)} file(s) "
                           f"({_mib(sum(e.size for e in need))}) that bundle has, e.g. {need[0].path}; nothing was "
                           "changed", hint=f"pass --base DIR, the unpacked folder of {b['name']} {b['version']} on "
                                           "this box, or carry the full bundle")
    try:
        data = policy.read_once(base / mf.MANIFEST, policy.MAX_MANIFEST)
    except OSError as e:
        raise BundlerError(f"--base {base}: its manifest.json cannot be read ({e.strerror}); nothing was changed",
                           hint=f"name the unpacked folder of {b['name']} {b['version']}")
    got = hashlib.sha256(data).hexdigest()
    if got != b["manifest_sha256"]:
        raise BundlerError(f"--base {base} is not the bundle this delta was made over: its manifest's sha256 is "
                           f"{got[:16]}…, the delta needs {what}; nothing was changed",
                           hint=f"name the folder of {b['name']} {b['version']} as it was bundled")
    by_sha: dict[str, mf.ManifestEntry] = {}
    for e in mf.entries_of(mf.parse(data, base)):
        by_sha.setdefault(e.sha256, e)
    info(f"delta over {what}: {'taking' if write else 'checking'} {len(need)} file(s) "
         f"({_mib(sum(e.size for e in need))}) from {base}" + ("" if write else " (dry run: nothing copied)"))
    for e in need:
        src = by_sha.get(e.sha256)
        if src is None or not all(mf.safe_relpath(x) for x in (src.path, *(p.path for p in src.parts))):
            raise BundlerError(f"{base}: its manifest lists no file with {e.path}'s sha256 ({e.sha256[:16]}…); "
                               "nothing was changed", hint="carry the full bundle")
        _copy_checked(base, src, bundle / e.path if write else None, e)
    return set() if write else {e.path for e in need}


def _present(bundle: Path, e: mf.ManifestEntry) -> bool:
    """Already filled in (a second run), or carried in parts: left to verification."""
    p = bundle / e.path
    return (p.is_file() and p.stat().st_size == e.size) or any((bundle / part.path).exists() for part in e.parts)


def _pieces(base: Path, src: mf.ManifestEntry) -> list[tuple[str, int]]:
    """The base's file as it lies there: whole, or its parts (path, size each)."""
    if src.parts and not (base / src.path).is_file():
        return [(p.path, p.size) for p in src.parts]
    return [(src.path, src.size)]


def _copy_checked(base: Path, src: mf.ManifestEntry, dest: Path | None, want: mf.ManifestEntry) -> None:
    """src's bytes (its parts joined, where the base carried them in parts) hashed against `want`, and
    written to dest (None: only hashed). Each piece must be a regular file of exactly its size."""
    h = hashlib.sha256()
    out = None
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}{SUFFIX}") if dest is not None else None
    try:
        if tmp is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(tmp):  # this pid's own left-over
                os.unlink(tmp)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        for rel, size in _pieces(base, src):
            fd = os.open(base / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    raise BundlerError(f"--base {base}: {rel} is not the regular file of {size} bytes its manifest "
                                       "lists; nothing was changed", hint="copy the base bundle again")
                left = size
                while left:
                    block = os.read(fd, min(8 << 20, left))
                    if not block:
                        break
                    left -= len(block)
                    h.update(block)
                    view = memoryview(block)
                    while out is not None and view:
                        view = view[os.write(out, view):]
            finally:
                os.close(fd)
        if out is not None:
            os.fchmod(out, want.mode)
            os.fsync(out)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise BundlerError(f"--base {base}: {src.path} cannot be read ({err.strerror}); nothing was changed",
                           hint="name the complete folder of the base bundle")
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if out is not None:
            os.close(out)
    if h.hexdigest() != want.sha256:
        if tmp is not None:
            tmp.unlink()
        raise BundlerError(f"--base {base}: {src.path} is not what this bundle's manifest pins for {want.path} "
                           f"(sha256 {h.hexdigest()[:16]}…, expected {want.sha256[:16]}…); nothing was changed",
                           hint="copy the base bundle again from its source")
    if tmp is not None:
        os.replace(tmp, dest)
