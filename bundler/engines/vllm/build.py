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
from ...boxlock import download, lock_requirements, newest
from ...toolchains import zig_wheel
from . import NAME


def lock_for_box(version: str, box: Any, workdir: Path, log=print) -> tuple[dict[str, tuple[str, list[str]]], dict]:
    """Lock vllm==version for the box; return (pins to carry, summary)."""
    return lock_requirements([f"vllm=={version}"], box, workdir, f"vllm=={version}", log=log,
                             hint="pick a vLLM version that pins the box's torch (vLLM 0.26.0 pins torch 2.11.0), "
                                  'or version = "latest", which carries the torch it needs')


LATEST = "latest"
CUDA13_DRIVER = 580  # vLLM's and torch's CUDA 13 wheels need this driver or newer


def lock_latest(box: Any, workdir: Path, log=print) -> tuple[str, dict[str, tuple[str, list[str]]], dict, str]:
    """version = "latest": the newest vLLM on the index for the box's Python and platform. Where it runs on
    the box's own torch stack, that stack is kept; where it pins another torch, it carries its own.
    Returns (version, pins to carry, summary, why: one line the plan and manifest show)."""
    from ...errors import BundlerError

    driver = box.gpus[0].driver if box.gpus else ""
    if box.gpus and int(driver.split(".")[0] or 0) < CUDA13_DRIVER:
        raise BundlerError(f"the box's NVIDIA driver {driver} is older than {CUDA13_DRIVER}, which the newest "
                           "vLLM's CUDA 13 wheels need", hint="update the driver, or pin an older vLLM "
                                                               '(version = "0.26.0" and older: see docs/DESIGN.md)')
    version = newest("vllm", box, workdir)
    carry, summary = lock_requirements([f"vllm=={version}"], box, workdir, f"vllm=={version} (the newest)", log=log,
                                       keep_stack=False)
    torch_box = next((v for k, v in box.installed.items() if k.lower() == "torch"), "")
    torch_new = carry["torch"][0] if "torch" in carry else torch_box
    if torch_new.split("+")[0] == torch_box.split("+")[0]:
        carry, summary = lock_for_box(version, box, workdir, log=log)  # the box's stack fits it: keep it
        why = f"vLLM {version}, the newest that resolved on the index when bundled; it runs on the box's torch " \
              f"{torch_box}"
    else:
        why = (f"vLLM {version}, the newest that resolved on the index when bundled; it needs torch {torch_new}, "
               f"the box has {torch_box or 'none'}: its own torch stack is carried ({summary['carried']} wheels)"
               + (f", with the box's {len(summary['reuses'])} CUDA packages of the very versions it needs"
                  if summary["reuses"] else ""))
    log(why)
    return version, carry, summary, why


SPEC_TABLES = ("vllm",)


@dataclass(frozen=True)
class VllmSpec:
    """[engines.vllm]: the release bundled ("" = no vLLM in the bundle; "latest", the default once the table is
    written, = the newest that resolves for the box when bundling)."""

    version: str = ""
    # an include root (like /usr/include) holding the target Python's headers (pythonX.Y/Python.h), for
    # Triton on a box without them, when this machine's Python is another version
    python_headers: str = ""


def read_spec(table: str, r: Any, path: Path) -> VllmSpec:
    # [engines.vllm] written without a version: the newest (the spec asks for vLLM, not for a release)
    version = r.get("version", str, LATEST if r.present else "")
    if version and version != LATEST and not re.match(r"^\d+\.\d+(\.\d+)?$", version):
        r.fail("engines.vllm.version", f"is {version!r}", "pin a release, e.g. version = \"0.26.0\", or say "
               "version = \"latest\" (the newest on the index, with its own torch where the box's does not fit)")
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
            'add [engines.vllm] version = "latest" (the newest vLLM, with the torch it needs) or "0.26.0" (the '
            "newest on the box's torch 2.11, a smaller bundle) and bundle for the box: make bundle TARGET=box.json "
            "REUSE=1 (box.json from ./install.sh --probe there); or, to carry the model for another bundle's "
            "engines, [bundle] models_only = true")


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
    version, why = spec.vllm.version, ""
    with tempfile.TemporaryDirectory(prefix="airgap-vllm-") as td:
        if version == LATEST:
            version, carry, summary, why = lock_latest(target, Path(td), log=ctx.log)
        else:
            carry, summary = lock_for_box(version, target, Path(td), log=ctx.log)
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
    return [{"name": NAME, "backend": "cuda", "version": version, "dir": "engines/vllm", "why": why,
             "python": summary["python"], "arch": target.arch, "glibc": "2.28", "cuda": "13",
             "lock": summary, "reuses": reused, "cpu_flags": [], "python_headers": headers}]
