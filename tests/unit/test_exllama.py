"""Issue #14: the ExLlamaV2 engine's pieces that need no GPU: TabbyAPI's config from the plan, the
pinned TabbyAPI archive, what is locked, the extension's cache key, the spec's [engines.exllama],
and the private working folder tabby_run.py gives each start."""

import hashlib
import io
import json
import sysconfig
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from bundler import planner, spec
from bundler.engines import exllama, tabby_run
from bundler.engines.exllama import build as exllama_build
from bundler.errors import BundlerError, SpecError
from tests.unit.test_planner import _cards, _exl


def _plan(fmt, size, hw, conc, ctx):
    return planner.plan("m", _exl(fmt, *size), hw, planner.Intent(conc, ctx), engines_available=planner.ALL_ENGINES)


def test_tabbyapi_config_follows_the_plan():
    one = _plan("exl2", (32, 32, 5.3), _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", ""), 8, 8192)
    c = exllama.tabby_config(one, "/srv/models/abc", "llama", "0.0.0.0", 8080)
    m = c["model"]
    # EXL2 without flash-attn: one request at a time, and the KV cache sized for exactly that
    assert (m["backend"], m["max_batch_size"], m["max_seq_len"], m["cache_size"]) == ("exllamav2", 1, 8192, 8192)
    assert m["gpu_split_auto"] is True and "tensor_parallel" not in m
    assert (m["model_name"], c["airgap_llm"]["model_path"]) == ("llama", "/srv/models/abc")
    net = c["network"]
    assert (net["host"], net["port"], net["disable_auth"], net["disable_fetch_requests"]) == ("0.0.0.0", 8080, False,
                                                                                              True)
    assert c["developer"]["unsafe_launch"] is False

    split = _plan("exl2", (80, 64, 36.0), _cards(2, 24564, "NVIDIA GeForce RTX 4090", "8.9", "pcie"), 4, 4096)
    m = exllama.tabby_config(split, "/m", "big", "127.0.0.1", 8080)["model"]
    assert m["gpu_split_auto"] is False and m["gpu_split"] == list(split.gpu_split_gib) and len(m["gpu_split"]) == 2

    tp = exllama.tabby_config(replace(one, tensor_parallel=2), "/m", "x", "127.0.0.1", 8080)["model"]
    assert tp["tensor_parallel"] is True and "gpu_split" not in tp

    # --tune's reference: TabbyAPI as a user configures it by hand, nothing sized
    ref = exllama.tabby_config(replace(one, engine_defaults=True), "/m", "x", "127.0.0.1", 8080)["model"]
    assert set(ref) == {"model_dir", "model_name", "backend"}


def _targz(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name in links:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(ti)
    return buf.getvalue()


def test_the_pinned_archive_gives_the_server_and_its_requirements():
    files = exllama_build.read_archive(exllama.V2.tabby_archive, exllama.V2.tabby_sha256, exllama.V2)
    assert "main.py" in files and "common/auth.py" in files and "LICENSE" in files
    assert not any(f.startswith(("docs/", "colab/", "docker/")) for f in files)  # only what the server runs
    reqs = exllama_build.requirements(files, "0.3.2", exllama.V2)
    assert reqs[0] == "exllamav2==0.3.2"
    assert any(r.startswith("fastapi-slim") for r in reqs) and not any(r.startswith("winloop") for r in reqs)


def test_an_archive_that_is_not_the_pinned_one_or_not_plain_is_refused(tmp_path):
    good = {"tabbyAPI-x/main.py": b"print()", "tabbyAPI-x/pyproject.toml": b"[project]\ndependencies=[]\n"}
    a = tmp_path / "t.tar.gz"
    a.write_bytes(_targz(good))
    with pytest.raises(BundlerError) as e:
        exllama_build.read_archive(a, "0" * 64, exllama.V2)
    assert str(a) in e.value.message and "0" * 64 in e.value.message
    from hashlib import sha256

    a.write_bytes(_targz(good, links=("tabbyAPI-x/common/auth.py",)))
    with pytest.raises(BundlerError, match="not a regular file"):
        exllama_build.read_archive(a, sha256(a.read_bytes()).hexdigest(), exllama.V2)
    a.write_bytes(_targz({"tabbyAPI-x/README.md": b"x"}))
    with pytest.raises(BundlerError, match="not a TabbyAPI source archive"):
        exllama_build.read_archive(a, sha256(a.read_bytes()).hexdigest(), exllama.V2)
    a.write_bytes(_targz({**good, "tabbyAPI-x/../../evil.py": b"x"}))
    with pytest.raises(BundlerError, match="not a path inside one top folder"):
        exllama_build.read_archive(a, sha256(a.read_bytes()).hexdigest(), exllama.V2)
    with pytest.raises(BundlerError, match="no such file") as e:
        exllama_build.read_archive(tmp_path / "missing.tar.gz", "0" * 64, exllama.V2)
    assert "git -C tabbyAPI archive" in e.value.hint


def test_the_extension_is_rebuilt_when_any_input_changes():
    base = ("a" * 64, "3.12", "2.11.0", "13", "9.0", "b" * 64)
    key = exllama_build.ext_key(*base)
    for i in range(len(base)):
        other = list(base)
        other[i] = other[i] + "x"
        assert exllama_build.ext_key(*other) != key


def test_spec_engines_exllama(write_spec):
    head = '[bundle]\nname = "x"\n[[models]]\nsource = "hf://o/r@4.0bpw"\nformat = "exl2"\n'
    s = spec.load(write_spec(head))
    assert (s.exllama.version, s.exllama.tabbyapi) == ("0.3.2", "")  # the archive third_party/ holds
    p = write_spec(head + '[engines.exllama]\ntabbyapi = "tabby.tar.gz"\n')
    with pytest.raises(SpecError) as e:
        spec.load(p)
    assert "engines.exllama.tabbyapi_sha256" in e.value.message and "sha256sum" in e.value.hint
    s = spec.load(write_spec(head + f'[engines.exllama]\ntabbyapi = "tabby.tar.gz"\ntabbyapi_sha256 = "{"A" * 64}"\n'))
    assert s.exllama.tabbyapi == str(p.parent / "tabby.tar.gz") and s.exllama.tabbyapi_sha256 == "a" * 64
    with pytest.raises(SpecError, match="engines.exllama.version"):
        spec.load(write_spec(head + '[engines.exllama]\nversion = "latest"\n'))


def test_each_start_gets_a_fresh_private_folder_with_the_key(tmp_path):
    tree = tmp_path / "tabbyapi"
    (tree / "common").mkdir(parents=True)
    (tree / "main.py").write_text("")
    (tree / "config.yml").write_text("stale")  # never taken from the tree
    model = tmp_path / "models" / "0123"
    model.mkdir(parents=True)
    plan = _plan("exl2", (32, 32, 5.3), _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", ""), 8, 8192)
    conf = exllama.tabby_config(plan, str(model), "llama", "127.0.0.1", 8081)
    run = tabby_run.prepare(tree, conf, "the-key", tmp_path / "cache")
    assert run == tmp_path / "cache" / "tabbyapi-8081"
    assert run.stat().st_mode & 0o777 == 0o700
    tokens = json.loads((run / "api_tokens.yml").read_text())
    assert (run / "api_tokens.yml").stat().st_mode & 0o777 == 0o600
    assert tokens["api_key"] == "the-key" and len(tokens["admin_key"]) == 64
    assert (run / "models" / "llama").resolve() == model and (run / "main.py").resolve() == tree / "main.py"
    written = json.loads((run / "config.yml").read_text())
    assert written["model"]["model_dir"] == str(run / "models") and "airgap_llm" not in written
    again = tabby_run.prepare(tree, conf, "the-key", tmp_path / "cache")
    assert json.loads((again / "api_tokens.yml").read_text())["admin_key"] != tokens["admin_key"]


def test_tabbyapis_key_log_line_is_masked():
    said = []

    class Log:
        def info(self, msg):
            said.append(msg)

    log = tabby_run._Masked(Log(), ["k1", "adminkey"])
    log.info("Your API key is: k1\nYour admin key is: adminkey")
    assert said == ["Your API key is: ****\nYour admin key is: ****"]


def test_an_extension_that_does_not_import_here_stops_the_install_before_anything_starts(tmp_path):
    from bundler.engines.exllama import prove_extension

    site = tmp_path / "site"
    (site / "exllamav2_ext").mkdir(parents=True)  # made for another Python/torch: here it cannot load
    (site / "exllamav2_ext" / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10 (torch 2.9)')")
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text("")
    with pytest.raises(BundlerError) as e:
        prove_extension(site, {"name": "exllamav2",
                                "extension": "exllamav2_ext-0.3.2+cu130.torch2.11.0-cp312-cp312-linux_x86_64.whl"})
    assert "does not import" in e.value.message and "undefined symbol" in e.value.message
    assert "nothing was started" in e.value.message and "--probe" in e.value.hint


def test_tensor_parallel_on_the_command_line_spans_every_gpu_or_none():
    from pathlib import Path

    from bundler.box.options import Options
    from bundler.box.planning import override_parallel

    hw = _cards(2, 24564, "NVIDIA GeForce RTX 4090", "8.9", "pcie")
    split = _plan("exl2", (80, 64, 36.0), hw, 4, 4096)
    assert len(split.gpu_split_gib) == 2
    tp = override_parallel(split, {}, hw, Options(bundle=Path("."), action="install", tensor_parallel=2))
    assert tp.tensor_parallel == 2 and tp.gpu_split_gib == () and "tensor parallel 2" in tp.reasons[-1]
    assert exllama.tabby_config(tp, "/m", "x", "127.0.0.1", 8080)["model"]["tensor_parallel"] is True
    for bad in ({"tensor_parallel": 3}, {"tensor_parallel": 2, "data_parallel": 2}):
        with pytest.raises(BundlerError) as e:
            override_parallel(split, {}, hw, Options(bundle=Path("."), action="install", **bad))
        assert "one replica" in e.value.message and "--tensor-parallel 2 or 1" in e.value.hint


def test_the_cuda_toolkit_is_found_behind_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    # as on this machine: nvcc on PATH is a script exec'ing the toolkit's own, whose parent torch would
    # take for CUDA_HOME, missing the toolkit's headers
    kit = tmp_path / "cuda-13.0"
    (kit / "bin").mkdir(parents=True)
    (kit / "include" / "crt").mkdir(parents=True)
    (kit / "include" / "crt" / "host_config.h").write_text("")
    (kit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\nexec {kit}/bin/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert exllama_build.cuda_home() == str(kit) and exllama_build.find_nvcc() == str(kit / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))  # one without the toolkit is passed over
    assert exllama_build.cuda_home() == str(kit)


# ---- ExLlamaV3 (EXL3): TabbyAPI's main, exllamav3 from PyPI, batching with Triton ------------------

def test_the_exllamav3_archive_is_tabbyapis_main_and_its_lock_leaves_out_the_github_pins():
    files = exllama_build.read_archive(exllama.V3.tabby_archive, exllama.V3.tabby_sha256, exllama.V3)
    assert "backends/exllamav3/model.py" in files and "backends/exllamav2/model.py" not in files
    reqs = exllama_build.requirements(files, exllama.V3.version, exllama.V3)
    assert reqs[0] == "exllamav3==1.4.2"
    # its extras pin torch and exllamav3 by download address: the box's torch is kept, exllamav3 is PyPI's
    assert not any("@" in r or r.startswith("torch") for r in reqs), reqs
    with pytest.raises(BundlerError) as e:  # the other generation's pin does not open it
        exllama_build.read_archive(exllama.V3.tabby_archive, exllama.V2.tabby_sha256, exllama.V3)
    assert "engines.exllamav3.tabbyapi" in e.value.message


def test_exl3_batches_and_its_config_names_the_exllamav3_backend():
    hw = _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", "")
    p = _plan("exl3", (32, 32, 5.3), hw, 8, 3000)
    assert p.engine == "exllamav3" and p.slots == 8  # no flash-attn needed: Triton's paged kernels
    m = exllama.tabby_config(p, "/m", "x", "127.0.0.1", 8080)["model"]
    assert (m["backend"], m["max_batch_size"], m["max_seq_len"]) == ("exllamav3", 8, 3000)
    assert m["cache_size"] == 24064  # 8 × 3000 tokens, rounded up to whole 256-token pages


def test_spec_engines_exllamav3(write_spec):
    head = '[bundle]\nname = "x"\n[[models]]\nsource = "hf://o/r@4.0bpw"\nformat = "exl3"\n'
    s = spec.load(write_spec(head))
    assert (s.exllamav3.version, s.exllamav3.tabbyapi, s.exllama.version) == ("1.4.2", "", "0.3.2")
    s = spec.load(write_spec(head + f'[engines.exllamav3]\nversion = "1.4.9"\ntabbyapi = "t.tar.gz"\n'
                                    f'tabbyapi_sha256 = "{"b" * 64}"\n'))
    assert (s.exllamav3.version, s.exllamav3.tabbyapi_sha256, s.exllama.tabbyapi) == ("1.4.9", "b" * 64, "")
    with pytest.raises(SpecError, match="engines.exllamav3.tabbyapi_sha256"):
        spec.load(write_spec(head + '[engines.exllamav3]\ntabbyapi = "t.tar.gz"\n'))


def test_an_exllamav3_extension_that_does_not_import_is_named_as_such(tmp_path):
    from bundler.engines.exllama import prove_extension

    site = tmp_path / "site"
    (site / "exllamav3_ext").mkdir(parents=True)
    (site / "exllamav3_ext" / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open')")
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text("")
    with pytest.raises(BundlerError) as e:
        prove_extension(site, {"name": "exllamav3"})
    assert "ExLlamaV3's extension (exllamav3_ext)" in e.value.message and "libcudart.so.12" in e.value.message


def test_a_box_without_a_c_compiler_is_refused_for_exllamav3_unless_the_bundle_brings_one(tmp_path, monkeypatch):
    from bundler.box.preflight import triton_toolchain

    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    doc = {"engines": [{"name": "exllamav3", "dir": "engines/exllamav3",
                        "python_headers": "engines/exllamav3/include"}], "files": []}
    with pytest.raises(BundlerError) as e:
        triton_toolchain(doc, "exllamav3", say=False)
    assert "ExLlamaV3's Triton kernels" in e.value.message
    doc["files"] = [{"path": "engines/exllamav3/wheels/ziglang-0.15.1-py3-none-manylinux_2_12_x86_64.whl"}]
    assert triton_toolchain(doc, "exllamav3", say=False)["cc"] == ""  # the bundle's Zig, then


@pytest.mark.parametrize("gen", [exllama.V2, exllama.V3], ids=lambda g: g.name)
def test_the_launch_sets_each_generations_own_needs(gen, tmp_path, monkeypatch):
    """ExLlamaV2: TabbyAPI's compatibility mode (no flash-attn). ExLlamaV3: Triton's C compiler: on a
    box without one, CC names the release's wrapper around the bundle's Zig clang and Python headers."""
    from bundler.box import release
    from bundler.box.layout import Layout

    monkeypatch.setattr(release, "engine_site", lambda *a: tmp_path / "site")
    monkeypatch.setattr(exllama, "prove_extension", lambda *a: "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no cc, gcc or clang on this "box"
    bundle, stage, final = tmp_path / "bundle", tmp_path / "stage", tmp_path / "final"
    inc = f"engines/{gen.name}/include/python3.12/Python.h"
    (bundle / inc).parent.mkdir(parents=True)
    (bundle / inc).write_text("/* the box python's headers */\n")
    (stage / "bin").mkdir(parents=True)
    doc = {"engines": [{"name": gen.name, "backend": "cuda", "dir": f"engines/{gen.name}",
                        "tabbyapi": f"engines/{gen.name}/tabbyapi",
                        "python_headers": f"engines/{gen.name}/include" if gen is exllama.V3 else ""}],
           "files": [{"path": inc, "sha256": hashlib.sha256((bundle / inc).read_bytes()).hexdigest()},
                     {"path": f"engines/{gen.name}/wheels/ziglang-0.17.1-py3-none-manylinux_2_12_x86_64.whl",
                      "sha256": "0" * 64}]}
    plan = _plan(gen.fmt, (32, 32, 5.3), _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", ""), 4, 4096)
    m = {"name": "m", "file": "/srv/model", "on_box": True}
    script = release._engine_script(bundle, doc, m, plan, Layout(tmp_path / "p", tmp_path / "etc", "svc"), "r1",
                                    final, stage, "127.0.0.1", 8080, False, {})
    conf = json.loads((stage / "tabbyapi-8080.json").read_text())
    assert conf["model"]["backend"] == gen.name
    if gen is exllama.V2:
        assert "EXLLAMA_NO_FLASH_ATTN" in script and "CC=" not in script and not (stage / "bin" / "cc").exists()
        assert conf["model"]["max_batch_size"] == 1
    else:
        assert "EXLLAMA_NO_FLASH_ATTN" not in script and f"CC={final / 'bin' / 'cc'}" in script.replace("'", "")
        wrapper = (stage / "bin" / "cc").read_text()
        assert f"exec {tmp_path / 'site' / 'ziglang' / 'zig'} cc" in wrapper  # the bundle's Zig clang
        if (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():  # this "box" has its own headers
            assert "this box's Python headers" in wrapper
        else:  # else the bundle's, hash-checked as they are copied into the release
            assert str(final / "include" / "python3.12") in wrapper
            assert (stage / "include" / "python3.12" / "Python.h").is_file()
        assert conf["model"]["max_batch_size"] == 4


def test_a_finished_extension_build_lands_in_a_fresh_cache(tmp_path):
    """The last step of a 10-minute build: its folder moved under the cache's key, where the generation's
    folder does not exist yet (it failed there once, losing the build)."""
    from bundler.engines.exllama.build import commit_build

    work = tmp_path / "exllama-build" / ".k.partial"
    work.mkdir(parents=True)
    (work / "x.whl").write_text("w")
    done = tmp_path / "exllamav3-ext" / "k"
    commit_build(work, done)
    assert (done / "x.whl").read_text() == "w" and not work.exists()
