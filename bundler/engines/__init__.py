"""The engines, each a package: its __init__ is the box side (what it serves and how it starts),
its build.py the bundle side. `get(name)` answers what core and box code ask of one (base.Engine)."""

from __future__ import annotations

from .base import Engine


def registry() -> dict[str, Engine]:
    """Every engine by name: one line per engine package."""
    from . import exllama, llama_cpp, vllm

    return {e.name: e for e in (llama_cpp.ENGINE, vllm.ENGINE, *exllama.ENGINES)}


def get(name: str | None) -> Engine:
    found = registry().get(name or "")
    if found is None:
        from ..errors import BundlerError

        raise BundlerError(f"no engine named {name!r} in this installer", hint="bundle again with this version")
    return found
