"""The toy engine, bundle side: nothing to build (its server is in the installer's own wheel)."""

from __future__ import annotations

import platform
from typing import Any

from . import NAME

NEEDS_BOX = False


def wanted(spec: Any) -> bool:
    return any(m.format == "toy" for m in spec.models)


def offers(spec: Any) -> list[str]:
    return [NAME]


def describe(spec: Any) -> str:
    return "Toy"


def bundle(ctx: Any) -> list[dict[str, Any]]:
    ctx.step("the toy engine (nothing to build)")
    return [{"name": NAME, "backend": "cpu", "dir": "engines/toy", "version": "1", "arch": platform.machine(),
             "glibc": "0", "cpu_flags": []}]
