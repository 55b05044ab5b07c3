"""A delta bundle carries only what its base lacked (bundler bundle --base): before the bundle is
verified, the files it left to its base are copied in from the base bundle's folder (install.sh
--base DIR), each hashed while it is copied against this bundle's own signed manifest. Then the
bundle verifies as a whole, like any other."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..errors import BundlerError
from .report import info


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fill_from_base(bundle: Path, doc: dict[str, Any], base: Path | None) -> None:
    delta = doc.get("delta")
    if not delta:
        if base is not None:
            info(f"--base {base}: this bundle carries every file itself; the base is not read")
        return
    b = delta["base"]
    entries = {e.path: e for e in mf.entries_of(doc)}
    need = [entries[p] for p in delta["from_base"] if not _present(bundle, entries[p])]
    if not need:
        return
    what = f"{b['name']} {b['version']} (manifest sha256 {b['manifest_sha256'][:16]}…)"
    if base is None:
        raise BundlerError(f"this is a delta bundle over {what}: it does not carry {len(need)} file(s) "
                           f"({_mib(sum(e.size for e in need))}) that bundle has, e.g. {need[0].path}; nothing was "
                           "changed", hint=f"pass --base DIR, the unpacked folder of {b['name']} {b['version']} on "
                                           "this box, or carry the full bundle")
    try:
        data = mf.read_bytes(base)
    except BundlerError as e:
        raise BundlerError(f"--base {base}: {e.message}; nothing was changed",
                           hint=f"name the unpacked folder of {b['name']} {b['version']}")
    got = hashlib.sha256(data).hexdigest()
    if got != b["manifest_sha256"]:
        raise BundlerError(f"--base {base} is not the bundle this delta was made over: its manifest's sha256 is "
                           f"{got[:16]}…, the delta needs {what}; nothing was changed",
                           hint=f"name the folder of {b['name']} {b['version']} as it was bundled")
    by_sha: dict[str, mf.ManifestEntry] = {}
    for e in mf.entries_of(mf.parse(data, base)):
        by_sha.setdefault(e.sha256, e)
    info(f"delta over {what}: taking {len(need)} file(s) ({_mib(sum(e.size for e in need))}) from {base}")
    for e in need:
        src = by_sha.get(e.sha256)
        if src is None or not all(mf.safe_relpath(x) for x in (src.path, *(p.path for p in src.parts))):
            raise BundlerError(f"{base}: its manifest lists no file with {e.path}'s sha256 ({e.sha256[:16]}…); "
                               "nothing was changed", hint="carry the full bundle")
        _copy_checked(base, src, bundle / e.path, e)


def _present(bundle: Path, e: mf.ManifestEntry) -> bool:
    """Already filled in (a second run), or carried in parts: left to verification."""
    p = bundle / e.path
    return (p.is_file() and p.stat().st_size == e.size) or any((bundle / part.path).exists() for part in e.parts)


def _copy_checked(base: Path, src: mf.ManifestEntry, dest: Path, want: mf.ManifestEntry) -> None:
    """src's bytes (its parts joined, where the base carried it in parts) into dest, hashed as written."""
    from ..files import SUFFIX

    pieces = [src.path] if (base / src.path).is_file() or not src.parts else [p.path for p in src.parts]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{SUFFIX}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    h = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            for rel in pieces:
                with open(os.open(base / rel, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                    for block in iter(lambda: f.read(8 << 20), b""):
                        h.update(block)
                        out.write(block)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise BundlerError(f"--base {base}: {src.path} cannot be read ({err.strerror}); nothing was changed",
                           hint="name the complete folder of the base bundle")
    if h.hexdigest() != want.sha256:
        tmp.unlink()
        raise BundlerError(f"--base {base}: {src.path} is not what this bundle's manifest pins for {want.path} "
                           f"(sha256 {h.hexdigest()[:16]}…, expected {want.sha256[:16]}…); nothing was changed",
                           hint="copy the base bundle again from its source")
    os.chmod(tmp, want.mode)
    os.replace(tmp, dest)
