"""Locking Python engines for the box's own Python and platform (vLLM, ExLlama and TabbyAPI's
dependencies): `uv pip compile` (pip-compile cannot lock for another interpreter), keeping the box's
CUDA stack (torch, triton, nvidia-*) at the versions it has, then preferring every other version the
box already has; only what the box lacks is downloaded and carried. Bundle side only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import BundlerError
from .contract.locks import normalize as _norm
from .contract.locks import parse
from .engines.vllm import GPU_STACK


def _uv() -> list[str]:
    exe = shutil.which("uv", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe:
        return [exe]
    try:
        import uv  # type: ignore[import-not-found]

        return [uv.find_uv_bin()]
    except ImportError:
        raise BundlerError("uv is needed to lock vLLM for another Python", hint="pip install -e '.[bundle]'")


def _target(box: Any) -> tuple[str, int, str]:
    """The box's Python (X.Y), glibc minor version and uv's platform tag for it."""
    python = ".".join(box.python.split(".")[:2])
    glibc_minor = int(box.glibc.split(".")[1]) if "." in box.glibc else 17
    return python, glibc_minor, f"{box.arch}-manylinux_2_{min(glibc_minor, 40)}"


def _compile(requirement: str, constraints: dict[str, str], python: str, platform_tag: str, out: Path) -> str:
    req = out.with_suffix(".in")
    req.write_text(requirement + "\n")
    con = out.with_suffix(".constraints")
    con.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
    proc = subprocess.run([*_uv(), "pip", "compile", str(req), "-c", str(con), "--python-version", python,
                           "--python-platform", platform_tag, "--generate-hashes", "--no-header", "--no-annotate",
                           "--quiet", "-o", str(out)], capture_output=True, text=True)
    return "" if proc.returncode == 0 else (proc.stdout + proc.stderr)


def lock_requirements(requirements: list[str], box: Any, workdir: Path, label: str, log=print,
                      hint: str = "", keep_stack: bool = True) -> tuple[dict[str, tuple[str, list[str]]], dict]:
    """Lock requirements for the box's Python and platform, keeping its CUDA stack (torch, triton,
    nvidia-*) as it is (keep_stack=False: whatever versions the requirements need, carried where the box
    has another) and preferring every other version it has; return (pins to carry, summary)."""
    python, _, platform_tag = _target(box)
    installed = {_norm(k): v for k, v in box.installed.items()}
    hard = {k: v for k, v in installed.items() if k.startswith(GPU_STACK)} if keep_stack else {}
    out = workdir / "engine.lock"
    requirement = "\n".join(requirements)
    log(f"locking {label} for Python {python} on {platform_tag} (uv), " +
        (f"keeping the box's torch {installed.get('torch', '?')} stack" if keep_stack else
         "with the torch stack it needs, carried"))
    err = _compile(requirement, hard, python, platform_tag, out)
    if err:
        raise BundlerError(f"cannot lock {label} against the box's CUDA stack:\n{err[-1500:]}",
                           hint=hint or "pick versions that work with the box's torch")
    pins = _pins(out.read_text())
    # prefer what the box has: constrain every other package it has at another version (keep_stack=False:
    # not its CUDA stack, whose versions are the engine's torch's to choose; where that choice is the
    # release the box has, by name and version, it is reused rather than carried, and checked like any reuse)
    prefer = dict(hard)
    prefer.update({n: installed[n] for n, (v, _) in pins.items()
                   if n in installed and installed[n] != v and (keep_stack or not n.startswith(GPU_STACK))})
    out2 = workdir / "engine-reuse.lock"
    for _ in range(5):  # drop the preferences the resolver names as conflicting, then try again
        if len(prefer) == len(hard):
            break
        err = _compile(requirement, prefer, python, platform_tag, out2)
        if not err:
            pins = _pins(out2.read_text())
            break
        named = {n for n in prefer if n not in hard and re.search(rf"\b{re.escape(n)}\b", err.lower())}
        if not named:
            break
        for n in named:
            del prefer[n]
    carry = {n: p for n, p in pins.items() if installed.get(n) != p[0]}
    summary = {"python": python, "platform": platform_tag, "resolved": len(pins), "reused": len(pins) - len(carry),
               "carried": len(carry)}
    # the box's CUDA stack packages the engine imports: the installer refuses a box whose versions moved
    stack = {n for n in pins if n not in carry and n.startswith(GPU_STACK)}
    summary["reuses"] = {k: v for k, v in box.installed.items() if _norm(k) in stack}
    log(f"{label} lock: {len(pins)} packages, {len(pins) - len(carry)} already on the box, {len(carry)} to carry")
    return carry, summary


def newest(name: str, box: Any, workdir: Path) -> str:
    """The newest release of `name` that resolves for the box's Python and platform, whatever it needs
    (lock_requirements' preference for what the box has could otherwise settle on an older one)."""
    python, _, platform_tag = _target(box)
    out = workdir / f"{name}-newest.lock"
    err = _compile(name, {}, python, platform_tag, out)
    if err:
        raise BundlerError(f"no release of {name} resolves for Python {python} on {box.arch}:\n{err[-1500:]}",
                           hint=f"pin a release of {name} in the spec")
    return _pins(out.read_text())[_norm(name)][0]


def download(carry: dict[str, tuple[str, list[str]]], box: Any, dest: Path, log=print) -> list[Path]:
    """Fetch the carried pins as wheels for the box (pip checks every hash)."""
    from . import lock

    python, glibc_minor, _ = _target(box)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="airgap-vllm-") as td:
        req = Path(td) / "carry.txt"
        req.write_text("".join(f"{n}=={v} {' '.join(h)}\n" for n, (v, h) in sorted(carry.items())))
        nodot = python.replace(".", "")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--dest", str(dest), "-r", str(req), "--python-version", python,
               "--implementation", "cp", "--abi", f"cp{nodot}", "--abi", "abi3", "--abi", "none"]
        for n in range(17, glibc_minor + 1):
            cmd += ["--platform", f"manylinux_2_{n}_{box.arch}"]
        cmd += ["--platform", f"manylinux2014_{box.arch}", "--platform", f"linux_{box.arch}"]
        log(f"downloading {len(carry)} wheels for the box (hash-checked by pip)")
        lock._run(cmd, "pip download of the engine's wheels", "a pin may have no wheel for the box's Python/platform")
    return lock.files_for([(n, v) for n, (v, _) in carry.items()], dest)


def _pins(text: str) -> dict[str, tuple[str, list[str]]]:
    """name → (version, ["--hash=sha256:…", …]) from uv's lock (contract/locks.py reads it)."""
    try:
        found = parse(text)
    except ValueError as e:
        raise BundlerError(f"uv wrote a lock this bundler cannot read: {e}", hint="report it with the lock")
    return {n: (v, [f"--hash=sha256:{h}" for h in hs]) for n, (v, hs) in found.items()}
