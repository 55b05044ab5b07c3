"""Where the bundle side keeps what is slow to make: builds, toolchains, wheels, models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/airgap-llm (XDG_CACHE_HOME honoured); AIRGAP_LLM_CACHE moves it."""
    base = os.environ.get("AIRGAP_LLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "airgap-llm"
    )
    return Path(base)
