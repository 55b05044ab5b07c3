from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bundles made by the tests ask no vulnerability database (none is reachable from these machines, and
# a test's bundle must not depend on what one says today): their report says "not checked". The
# lookup itself is tested against a local server speaking the database's API (tests/e2e/test_vulns.py).
os.environ.setdefault("AIRGAP_LLM_OSV_URL", "off")


def small_bundle(parent: Path) -> Path:
    """A tiny bundle directory (a model and an installer) with its manifest, at parent/b."""
    from bundler import manifest

    root = parent / "b"
    (root / "models").mkdir(parents=True)
    (root / "models" / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 100)
    (root / "install.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "install.sh").chmod(0o755)
    manifest.write(root, {"name": "b"}, manifest.scan(root))
    return root


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
