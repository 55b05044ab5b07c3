"""Wheels from the bundle into a folder, with nothing but the standard library and PyPA's
`installer` (pure Python, imported from its wheel): no pip, no distutils, no venv module, so a
box with only `python3` (Debian 11's 3.9 lacks distutils, minimal images lack ensurepip) works.

Each wheel is taken from the bundle only if its sha256 is one the lock names; wheels are
unpacked on every core (zlib and file writes release the GIL)."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import BundlerError
from ..files import copy_hashing
from ..contract import locks
from ..contract.locks import WHEEL_RE
from ..contract.locks import normalize as _norm


def read_lock(lock: Path) -> dict[str, tuple[str, set[str]]]:
    """{normalized name: (version, {sha256, …})} from `name==version --hash=sha256:…` lines."""
    try:
        pins = locks.parse(lock.read_text())
    except ValueError as e:
        raise BundlerError(f"{lock}: {e}", hint="copy the bundle again")
    return {n: (v, set(hs)) for n, (v, hs) in pins.items()}


def compatible(filename: str, python: tuple[int, int] = sys.version_info[:2], machine: str = "") -> bool:
    """Whether this interpreter can use the wheel (its glibc was checked in preflight)."""
    m = WHEEL_RE.match(filename)
    if not m:
        return False
    major, minor = python
    pys, abis, plats = m["py"].split("."), m["abi"].split("."), m["plat"].split(".")
    machine = machine or os.uname().machine
    if not any(p == "any" or p.endswith("_" + machine) for p in plats):
        return False
    cp = f"cp{major}{minor}"

    def older(tag: str, kind: str) -> bool:  # py37 / cp39: made for this minor or an older one
        rest = tag[len(kind) + 1:] if tag.startswith(f"{kind}{major}") else ""
        return tag == f"{kind}{major}" or (rest.isdigit() and int(rest) <= minor)

    if cp in pys and (cp in abis or "none" in abis or "abi3" in abis):
        return True
    if "abi3" in abis:
        return any(older(p, "cp") for p in pys)
    return "none" in abis and any(older(p, "py") or older(p, "cp") for p in pys)


def select(lock: Path, folder: Path, into: Path) -> list[Path]:
    """The wheel file for each pin of the lock that this interpreter can use, copied into `into` (a
    folder of ours) while its sha256 is checked: what is installed is the copy that was checked,
    never the bundle's file read a second time."""
    pins = read_lock(lock)
    by_name: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("*.whl")):
        m = WHEEL_RE.match(p.name)
        if m:
            by_name.setdefault(_norm(m["name"]), []).append(p)
    chosen = []
    for name, (version, hashes) in sorted(pins.items()):
        cands = [p for p in by_name.get(name, []) if WHEEL_RE.match(p.name)["ver"] == version
                 and compatible(p.name)]
        if not cands:
            raise BundlerError(f"{folder} has no wheel of {name} {version} for Python "
                               f"{sys.version_info[0]}.{sys.version_info[1]} on {os.uname().machine}",
                               hint="bundle for this box's Python (bundle.toml [target] pythons, or TARGET=box.json)")
        # the most specific tag first (cp311 before abi3 before py3)
        cands.sort(key=lambda p: (f"cp{sys.version_info[0]}{sys.version_info[1]}" not in p.name, "abi3" in p.name))
        path = cands[0]
        into.mkdir(mode=0o700, parents=True, exist_ok=True)
        copy = into / path.name
        digest = copy_hashing(path, copy)  # the copy is what gets installed
        if digest not in hashes:
            copy.unlink()
            raise BundlerError(f"{path}: sha256 {digest} is not one {lock} pins for {name} {version}",
                               hint="copy the bundle again")
        chosen.append(copy)
    return chosen



def install(wheels: list[Path], site: Path, scripts: Path | None = None, workers: int | None = None) -> float:
    """Unpack wheels into `site` (purelib and platlib), their scripts into `scripts`. Returns seconds."""
    from installer import install as _install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    class Overwriting(SchemeDictionaryDestination):
        # several wheels may ship the same namespace file (nvidia/__init__.py); like pip --target, last wins
        def write_to_fs(self, scheme, path, stream, is_executable):
            target = os.path.join(self.scheme_dict[scheme], path)
            os.makedirs(os.path.dirname(target), exist_ok=True)  # other threads make folders too
            if os.path.lexists(target):
                os.unlink(target)
            return super().write_to_fs(scheme, path, stream, is_executable)

    scripts = scripts or site.parent / "bin"
    schemes = {"purelib": str(site), "platlib": str(site), "scripts": str(scripts),
               "data": str(site.parent / "data"), "headers": str(site.parent / "include")}
    site.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def one(path: Path) -> None:
        dest = Overwriting(schemes, interpreter=sys.executable, script_kind="posix")
        with WheelFile.open(path) as source:
            _install(source, dest, {"INSTALLER": b"airgap-llm"})

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as pool:
        for f in [pool.submit(one, w) for w in wheels]:
            f.result()
    return time.monotonic() - t0
