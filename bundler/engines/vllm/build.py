"""vLLM, bundle side: locked for the box's Python and platform (bundler/boxlock.py), keeping the box's
CUDA stack; only what the box lacks is downloaded and carried.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import lock
from ...boxlock import download, lock_requirements
from ...toolchains import zig_wheel
from . import NAME


def lock_for_box(version: str, box: Any, workdir: Path, log=print) -> tuple[dict[str, tuple[str, list[str]]], dict]:
    """Lock vllm==version for the box; return (pins to carry, summary)."""
    return lock_requirements([f"vllm=={version}"], box, workdir, f"vllm=={version}", log=log,
                             hint="pick a vLLM version that pins the box's torch (vLLM 0.26.0 pins torch 2.11.0)")


SPEC_TABLES = ("vllm",)


@dataclass(frozen=True)
class VllmSpec:
    """[engines.vllm]: the release bundled ("" = no vLLM in the bundle)."""

    version: str = ""
    # an include root (like /usr/include) holding the target Python's headers (pythonX.Y/Python.h), for
    # Triton on a box without them, when this machine's Python is another version
    python_headers: str = ""


def read_spec(table: str, r: Any, path: Path) -> VllmSpec:
    version = r.get("version", str, "")
    if version and not re.match(r"^\d+\.\d+(\.\d+)?$", version):
        r.fail("engines.vllm.version", f"is {version!r}", "pin a release, e.g. version = \"0.26.0\"")
    headers = r.get("python_headers", str, "")
    if headers:
        headers = str((path.parent / headers).resolve()) if not Path(headers).is_absolute() else headers
        if not list(Path(headers).glob("python3.*/Python.h")):
            r.fail("engines.vllm.python_headers", f"{headers!r} holds no python3.X/Python.h",
                   "name an include root like /usr/include, with the target Python's headers under python3.X/ "
                   "(from its python3.X-dev package)")
    return VllmSpec(version=version, python_headers=headers)


def lacks(configs: dict[str, Any], m: Any) -> tuple[str, str] | None:
    """Why the spec bundles no vLLM for a safetensors model (None: it does)."""
    if configs["vllm"].version:
        return None
    return ("safetensors, which vLLM serves, and the spec bundles no vLLM",
            'add [engines.vllm] version = "0.26.0" and bundle for the box: make bundle TARGET=box.json REUSE=1 '
            "(box.json from ./install.sh --probe there); or, to carry the model for another bundle's engines, "
            "[bundle] models_only = true")


NEEDS_BOX = True  # locked against the box's own torch and CUDA stack: its probe file


def wanted(spec: Any) -> bool:
    return bool(spec.vllm.version)


def offers(spec: Any) -> list[str]:
    return [NAME]


def describe(spec: Any) -> str:
    return f"vLLM {spec.vllm.version}"


def bundle(ctx: Any) -> list[dict[str, Any]]:
    """vLLM's wheels locked for the box, Zig's C compiler and the box Python's headers for Triton."""
    spec, target = ctx.spec, ctx.target
    ctx.needs_box("vLLM")
    ctx.step(f"vLLM {spec.vllm.version} for the box")
    edir = ctx.stage / "engines" / "vllm"
    with tempfile.TemporaryDirectory(prefix="airgap-vllm-") as td:
        carry, summary = lock_for_box(spec.vllm.version, target, Path(td), log=ctx.log)
    wheels = download(carry, target, lock.wheel_cache() / "vllm", log=ctx.log)
    (edir / "wheels").mkdir(parents=True)
    for w in wheels:
        ctx.link(w, edir / "wheels" / w.name)
    # Triton compiles a C launcher for each kernel at first use: a C compiler for boxes without one
    # (Zig's clang, from its wheel, into the engine's site) and, where this machine has them, the
    # headers of the box's Python
    zw = zig_wheel(target.arch, ctx.log)
    ctx.link(zw, edir / "wheels" / zw.name)
    lock.write_install_lock(edir / "wheels", edir / "requirements.lock")
    headers = ctx.python_headers(edir)
    reused = summary.pop("reuses")
    return [{"name": NAME, "backend": "cuda", "version": spec.vllm.version, "dir": "engines/vllm",
             "python": summary["python"], "arch": target.arch, "glibc": "2.28", "cuda": "13",
             "lock": summary, "reuses": reused, "cpu_flags": [], "python_headers": headers}]
