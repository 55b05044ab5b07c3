"""The box side's small decisions: env files as data, ownership, the prefix lock, wheel tags,
and which CPU backend ggml will load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bundler import envfile
from bundler.box import layout as lay
from bundler.box import wheels
from bundler.engines.llama_cpp import best_cpu_variant
from bundler.errors import BundlerError


def test_env_file_is_read_as_data_never_run():
    env = envfile.parse("# key\nLLAMA_API_KEY=sk-$(reboot)\n\nHF_HUB_OFFLINE=1\n")
    assert env == {"LLAMA_API_KEY": "sk-$(reboot)", "HF_HUB_OFFLINE": "1"}
    with pytest.raises(ValueError, match="f.env:2: not KEY=VALUE"):
        envfile.parse("A=1\ntouch /tmp/pwned\n", "f.env")


def test_a_folder_others_can_write_or_another_user_owns_is_not_trusted(tmp_path):
    d = tmp_path / "prefix"
    d.mkdir()
    lay.check_not_writable_by_others(d, "the install prefix")  # ours, 0755
    d.chmod(0o777)
    with pytest.raises(BundlerError, match="can be written by everyone"):
        lay.check_not_writable_by_others(d / "etc" / "x.env", "the env file")  # the folder above counts too
    d.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)
        with pytest.raises(BundlerError, match=r"belongs to user nobody \(uid 65534\)"):
            lay.check_not_writable_by_others(d, "the install prefix")
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: a folder of ours inside it is fine
    (sticky / "mine").mkdir()
    lay.check_not_writable_by_others(sticky / "mine", "the install prefix")


def test_a_second_locker_of_the_prefix_is_refused_and_told_who_holds_it(tmp_path):
    with lay.PrefixLock(tmp_path):
        code = ("import sys; from pathlib import Path; from bundler.box.layout import PrefixLock\n"
                "from bundler.errors import BundlerError\n"
                f"try:\n    PrefixLock(Path({str(tmp_path)!r})).__enter__()\n"
                "except BundlerError as e:\n    print(e.message); sys.exit(1)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 1 and f"pid {os.getpid()}" in r.stdout and "another install" in r.stdout
    with lay.PrefixLock(tmp_path):  # released: taken again
        pass


def test_make_dirs_returns_only_what_it_made(tmp_path):
    (tmp_path / "a").mkdir()
    made = lay.make_dirs(tmp_path / "a" / "b" / "c", 0o700)
    assert made == [tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert lay.make_dirs(tmp_path / "a" / "b") == []


@pytest.mark.parametrize("name,py,ok", [
    ("markupsafe-3.0.2-cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", (3, 9), True),
    ("markupsafe-3.0.2-cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", (3, 11), False),
    ("cryptography-44.0.0-cp39-abi3-manylinux_2_28_x86_64.whl", (3, 12), True),
    ("cryptography-44.0.0-cp39-abi3-manylinux_2_28_aarch64.whl", (3, 12), False),
    ("jinja2-3.1.6-py3-none-any.whl", (3, 13), True),
    ("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl", (3, 11), False),
    ("interegular-0.3.3-py37-none-any.whl", (3, 12), True),  # vLLM needs it: a py3X tag counts up to 3.X
    ("six-1.17.0-py2.py3-none-any.whl", (3, 9), True),
    ("future-9.9-py314-none-any.whl", (3, 12), False),
])
def test_wheel_tags_this_interpreter_can_use(name, py, ok):
    assert wheels.compatible(name, py, "x86_64") is ok


def test_ggml_loads_the_best_cpu_backend_the_cpu_runs():
    variants = ("x64", "sse42", "sandybridge", "haswell", "skylakex", "icelake", "zen4", "alderlake",
                "sapphirerapids")
    haswell = ("avx", "avx2", "bmi2", "f16c", "fma", "sse4_2")
    assert best_cpu_variant(haswell, variants) == "haswell"
    assert best_cpu_variant(haswell + ("avx_vnni",), variants) == "alderlake"
    avx512 = haswell + ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni")
    assert best_cpu_variant(avx512, variants) == "icelake"
    assert best_cpu_variant(avx512 + ("avx512_bf16",), variants) == "zen4"
    assert best_cpu_variant(avx512 + ("avx512_bf16", "amx_tile", "amx_int8"), variants) == "sapphirerapids"
    assert best_cpu_variant((), variants) == "x64"  # any x86-64
    assert best_cpu_variant(haswell, ("haswell",)) == "haswell"
    assert best_cpu_variant(("sse4_2",), ("haswell",)) == ""


def test_bundle_versions_follow_pep_440_so_a_release_candidate_is_older():
    from bundler.box.trust import version_key

    order = ["1.0.0.dev1", "1.0.0a1", "1.0.0b2", "1.0.0rc1", "1.0.0", "1.0.0.post1", "1.0.1", "1.1", "2.0"]
    assert sorted(order, key=version_key) == order
    assert version_key("1.0") == version_key("1.0.0")
    assert version_key("1.0.0rc1") < version_key("1.0.0")  # the letters were dropped: rc1 counted as newer
    with pytest.raises(BundlerError, match="not a PEP 440 version"):
        version_key("banana")


def test_a_file_swapped_after_the_check_is_refused_when_copied_into_the_release(tmp_path):
    """The engine folder was copied without a hash: a binary swapped between the check and the
    copy (a bundle unpacked by a user, installed with sudo) would have run as the engine."""
    import hashlib

    from bundler.box.release import copy_verified

    bundle = tmp_path / "b"
    exe = bundle / "engines" / "e" / "bin" / "llama-server"
    exe.parent.mkdir(parents=True)
    exe.write_bytes(b"the checked binary")
    doc = {"files": [{"path": "engines/e/bin/llama-server", "size": 18, "mode": 0o755,
                      "sha256": hashlib.sha256(b"the checked binary").hexdigest()}]}
    copy_verified(bundle, doc, "engines/e", tmp_path / "ok")
    assert (tmp_path / "ok" / "bin" / "llama-server").read_bytes() == b"the checked binary"
    assert (tmp_path / "ok" / "bin" / "llama-server").stat().st_mode & 0o777 == 0o755
    exe.write_bytes(b"a swapped binary!!")
    with pytest.raises(BundlerError, match="changed while it was copied"):
        copy_verified(bundle, doc, "engines/e", tmp_path / "bad")
    assert [p.name for p in (tmp_path / "bad").rglob("*") if p.is_file()] == []


def test_every_vllm_route_but_health_needs_the_key():
    """vLLM's --api-key guards /v1 only: POST /invocations answered completions without it."""
    import asyncio

    from bundler.engines.vllm_auth import KeyOnEveryRoute

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = KeyOnEveryRoute(app, key="sk-right")

    def call(path, headers=()):
        sent = []

        async def send(msg):
            sent.append(msg)

        asyncio.run(guard({"type": "http", "path": path, "headers": list(headers)}, None, send))
        return sent[0]["status"]

    for path in ("/invocations", "/tokenize", "/detokenize", "/pooling", "/score", "/metrics", "/openapi.json",
                 "/docs", "/v1/models", "/v1/chat/completions", "/load", "/version"):
        assert call(path) == 401, path
        assert call(path, [(b"authorization", b"Bearer sk-wrong")]) == 401, path
        assert call(path, [(b"authorization", b"Bearer sk-right")]) == 200, path
    assert call("/invocations", [(b"x-api-key", b"sk-right")]) == 200
    assert call("/health") == 200
    assert reached.count("/invocations") == 2 and "/health" in reached
    with pytest.raises(RuntimeError, match="VLLM_API_KEY is empty"):
        KeyOnEveryRoute(app, key="")


def test_the_key_pinned_is_the_one_that_verified_not_the_first_with_its_id(tmp_path, monkeypatch):
    """Two keys with one key id (the id is 8 bytes any key file can claim): the first given did not
    verify, the second did; the first was pinned."""
    from bundler import manifest, signing
    from bundler.box.layout import Layout
    from bundler.box.options import Options
    from bundler.box.trust import check_trust
    from tests.conftest import small_bundle

    monkeypatch.setenv("AIRGAP_LLM_SIGNING_KEY", str(tmp_path / "k" / "signing-key.pem"))
    root = small_bundle(tmp_path)
    real = signing.sign(root, log=lambda *_: None)
    impostor = signing.PublicKey(real.key_id, bytes(32))
    (tmp_path / "impostor.pub").write_text(impostor.to_text())
    (tmp_path / "real.pub").write_text(real.to_text())
    opts = Options(bundle=root, action="install", trust=(tmp_path / "impostor.pub", tmp_path / "real.pub"))
    layout = Layout(tmp_path / "prefix", tmp_path / "etc", "b")
    data = (root / "manifest.json").read_bytes()
    record = check_trust(root, manifest.parse(data, root), layout, opts, data)
    # the pin is the verified key's bytes, never a file read again (signer.pub could be swapped meanwhile)
    assert signing.parse_public_key(record["pin"], "pin") == real and record["key"] == real.fingerprint


def test_a_repository_model_is_stored_once_with_its_layout_and_every_file_hashed(tmp_path):
    """A whole-repo model (safetensors for vLLM) keeps its folders; a file swapped in the bundle
    after the check is refused, and a path out of the model's folder is refused before any copy."""
    import hashlib

    from bundler.box.release import store_model

    bundle = tmp_path / "b"
    files = {"config.json": b"{}", "model-00001-of-00002.safetensors": b"a" * 100, "sub/tokenizer.json": b"t"}
    for p, data in files.items():
        (bundle / "models/tiny" / p).parent.mkdir(parents=True, exist_ok=True)
        (bundle / "models/tiny" / p).write_bytes(data)
    m = {"name": "tiny", "file": "models/tiny", "dir": True, "sha256": "f" * 64,
         "files": [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for p, d in files.items()]}
    layout = lay.Layout(prefix=tmp_path / "p", etc=tmp_path / "p/etc", name="n")
    folder = store_model(bundle, m, layout)
    assert folder == tmp_path / "p/models" / ("f" * 64)
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert store_model(bundle, m, layout) == folder  # a second release reuses what is stored
    (bundle / "models/tiny/config.json").write_bytes(b"[]")
    (folder / "config.json").unlink()
    with pytest.raises(BundlerError, match="changed while it was copied"):
        store_model(bundle, m, layout)
    evil = dict(m, files=[{"path": "../../etc/cron.d/x", "sha256": "0" * 64, "size": 1}])
    with pytest.raises(BundlerError, match="not a plain path inside its folder"):
        store_model(bundle, evil, layout)
    assert not (tmp_path / "p/etc/cron.d").exists()


def _vllm_doc(zig: bool, headers: str) -> dict:
    files = [{"path": "engines/vllm/wheels/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"}]
    if zig:
        files.append({"path": "engines/vllm/wheels/ziglang-0.17.1-py3-none-manylinux_2_12_x86_64.whl"})
    return {"engines": [{"name": "vllm", "dir": "engines/vllm", "python_headers": headers}], "files": files}


def test_triton_toolchain_uses_the_box_or_the_bundle_and_refuses_a_box_with_neither(monkeypatch, tmp_path):
    import shutil
    import sysconfig

    from bundler.box.preflight import triton_toolchain
    from bundler.errors import BundlerError

    inc = tmp_path / "include"
    inc.mkdir()
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(inc)})
    monkeypatch.setattr(shutil, "which", lambda c: None)  # no cc, gcc or clang
    with pytest.raises(BundlerError) as e:
        triton_toolchain(_vllm_doc(zig=False, headers=""), "vllm", say=False)
    assert "no C compiler" in e.value.message and "install gcc" in e.value.message
    assert "python3." in e.value.message and "-dev" in e.value.message  # what to install, by name
    assert triton_toolchain(_vllm_doc(zig=True, headers="engines/vllm/include"), "vllm", say=False) == {
        "cc": "", "headers": "engines/vllm/include", "flashinfer_jit": ""}
    (inc / "Python.h").write_text("")
    monkeypatch.setattr(shutil, "which", lambda c: "/usr/bin/gcc" if c == "gcc" else None)
    assert triton_toolchain(_vllm_doc(zig=False, headers=""), "vllm", say=False) == {
        "cc": "/usr/bin/gcc", "headers": "", "flashinfer_jit": ""}
    assert triton_toolchain({"engines": [{"name": "llama.cpp"}], "files": []}, "vllm", say=False) == {}


def test_the_install_transactions_decisions_are_pure():
    """"Is this the same release" was a split("-safe") inline; a plan came back from JSON through
    __dataclass_fields__ in the lifecycle."""
    from bundler import planner
    from bundler.box.lifecycle import release_name, same_release

    assert same_release("abc123", "abc123") and same_release(release_name("abc123", True), "abc123")
    assert not same_release("abc123-safe-x", "abc123") and not same_release("abc12", "abc123")
    assert not same_release("abc123", "abc123-safe")
    p = planner.Plan(engine="vllm", backend="cuda", model="m", threads=4, slots=8, context_per_slot=4096,
                     gpu_layers=32, total_layers=32, memory_per_gpu_gib=(1.5, 2.0), warnings=("w",))
    d = p.to_dict()
    d["a_field_of_a_later_version"] = 1
    assert planner.Plan.from_dict(d) == p


def test_the_installer_and_bootstrap_find_the_pinned_keys_in_one_place(tmp_path):
    from bundler.box.layout import layout_for
    from bundler.box.options import Options
    from bundler.contract import trust as policy

    for prefix, config in ((tmp_path / "p", None), (tmp_path / "p", tmp_path / "c"), (None, None)):
        opts = Options(bundle=tmp_path, action="install", prefix=prefix, config_dir=config)
        lay = layout_for(opts, "b")
        assert str(lay.etc) == policy.config_dir(str(prefix or ""), str(config or ""), 0)


def test_what_a_failed_install_undoes_is_one_decision():
    from bundler.box.lifecycle import undo_action

    assert undo_action(previous=True, stopped=True, mode="process") == "restart"
    assert undo_action(previous=True, stopped=True, mode="systemd") == "restart"
    assert undo_action(previous=False, stopped=False, mode="systemd") == "remove-unit"  # no unit left behind
    assert undo_action(previous=False, stopped=False, mode="process") == "nothing"
    assert undo_action(previous=True, stopped=False, mode="process") == "nothing"  # it was not serving
