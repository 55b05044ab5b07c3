"""The engines, each a package: its __init__ is the box side (what it serves and how it starts),
its build.py the bundle side. `get(name)` answers what core and box code ask of one (base.Engine)."""

from __future__ import annotations

import importlib

from .base import Engine

# The engine packages, in the order the bundle builds them: a new engine is one package and one name here
PACKAGES = ("llama_cpp", "vllm", "exllama")


def registry() -> dict[str, Engine]:
    """Every engine by name (a package may define several: ExLlama's generations)."""
    return {e.name: e for pkg in PACKAGES for e in importlib.import_module(f"{__name__}.{pkg}").ENGINES}


def get(name: str | None) -> Engine:
    found = registry().get(name or "")
    if found is None:
        from ..errors import BundlerError

        raise BundlerError(f"no engine named {name!r} in this installer", hint="bundle again with this version")
    return found


def for_format(fmt: str) -> Engine | None:
    """The first engine, in the registry's order, that serves models of this format."""
    return next((e for e in registry().values() if fmt in e.formats), None)


def formats() -> tuple[str, ...]:
    """Every model format some engine serves, in the registry's order."""
    return tuple(dict.fromkeys(f for e in registry().values() for f in e.formats))
