"""vLLM, bundle side: locked for the box's Python and platform (bundler/boxlock.py), keeping the box's
CUDA stack; only what the box lacks is downloaded and carried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...boxlock import lock_requirements


def lock_for_box(version: str, box: Any, workdir: Path, log=print) -> tuple[dict[str, tuple[str, list[str]]], dict]:
    """Lock vllm==version for the box; return (pins to carry, summary)."""
    return lock_requirements([f"vllm=={version}"], box, workdir, f"vllm=={version}", log=log,
                             hint="pick a vLLM version that pins the box's torch (vLLM 0.26.0 pins torch 2.11.0)")
