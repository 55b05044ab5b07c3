from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec file from a TOML string; returns its path."""

    def _write(text: str) -> Path:
        p = tmp_path / "spec.toml"
        p.write_text(textwrap.dedent(text))
        return p

    return _write


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the model/build cache at an empty temporary directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRGAP_LLM_CACHE", str(cache))
    return cache
