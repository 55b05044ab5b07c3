"""vLLM, bundle side: locked for the box's Python and platform (bundler/boxlock.py), keeping the box's
CUDA stack; only what the box lacks is downloaded and carried.
"""

from __future__ import annotations

import tempfile
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
