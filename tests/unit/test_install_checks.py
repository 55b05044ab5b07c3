"""The installer's refusals before any change: a box that breaks what the bundle assumed."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bundler.box import layout as box_layout
from bundler.box import preflight as box_preflight
from bundler.box import release as box_release
from bundler.box.health import LogWatch
from bundler.errors import BundlerError
from bundler.probe import Hardware

DATA = Path(__file__).resolve().parents[1] / "data"


def device_box() -> Hardware:
    return Hardware.from_dict(json.loads((DATA / "boxes" / "device-h200x2-probe.json").read_text()))


def doc(target):
    return {"engines": [{"name": "vllm", "arch": "x86_64", "glibc": "2.28"}],
            "files": [{"path": "wheels/x.whl", "size": 10, "sha256": "0" * 64}], "models": [], "target": target}


def layout(tmp_path):
    return box_layout.Layout(tmp_path / "prefix", tmp_path / "etc", "b")


TARGET = {"python": "3.12", "arch": "x86_64", "glibc_min": "2.39", "driver_min": "580",
          "installed": {"torch": "2.11.0", "nvidia-cublas": "13.1.0.3"}, "python_path": "/opt/torch/.venv/bin/python3"}


def test_the_box_the_bundle_was_made_for_passes(tmp_path):
    box_preflight.preflight(doc(TARGET), device_box(), layout(tmp_path))


def test_another_python_missing_torch_and_an_old_driver_are_each_named(tmp_path):
    hw = device_box()
    old = tuple(replace(g, driver="535.104.05") for g in hw.gpus)
    hw = replace(hw, python="3.11.7", installed={k: v for k, v in hw.installed.items() if k != "torch"}, gpus=old)
    with pytest.raises(BundlerError) as e:
        box_preflight.preflight(doc(TARGET), hw, layout(tmp_path))
    msg = e.value.message
    assert "made for Python 3.12, this installer runs on 3.11" in msg and "AIRGAP_LLM_PYTHON=/opt/torch" in msg
    assert "reuses torch 2.11.0" in msg and "has none" in msg
    assert "driver >= 580" in msg and "535.104.05" in msg
    assert e.value.hint == "nothing was changed"
    assert not (tmp_path / "prefix").exists()


def test_too_little_disk_names_both_figures(tmp_path):
    hw = replace(device_box(), disk_free=1000)
    d = doc(None)
    d["files"][0]["size"] = 10 << 30
    with pytest.raises(BundlerError) as e:
        box_preflight.preflight(d, hw, layout(tmp_path))
    assert "GiB free, the install needs" in e.value.message and "--prefix" in e.value.message


def test_a_fatal_engine_line_in_the_log_is_seen_only_after_the_start(tmp_path):
    from bundler.engines import vllm

    log = tmp_path / "svc.log"
    log.write_text("old run: CUDA error: an illegal memory access was encountered\n")
    watch = LogWatch(vllm.FATAL_LOG, log)
    assert watch.fatal() == ""  # what an earlier run wrote does not count
    with open(log, "a") as f:
        f.write("(Worker_TP0 pid=2171) INFO loading\n"
                "(EngineCore pid=1931) RuntimeError: Worker failed with error "
                "'CUDA error: CUBLAS_STATUS_INTERNAL_ERROR'\n")
    assert "CUBLAS_STATUS_INTERNAL_ERROR" in watch.fatal()


def test_safe_tensor_parallel_flags_follow_the_vllm_version():
    from bundler.engines import vllm

    old = vllm.safe_tp_flags("0.26.0")
    assert old[0] == "--disable-custom-all-reduce"
    assert json.loads(old[2]) == {"pass_config": {"fuse_allreduce_rms": False}}
    assert json.loads(vllm.safe_tp_flags("0.33.0")[2]) == {"pass_config": {"enable_fi_allreduce_fusion": False}}


def test_multicast_switched_off_in_the_environment_means_safe_flags_and_travels_to_the_engine():
    from bundler.engines import vllm

    box_env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PATH": "/usr/bin"}
    assert vllm.multicast_off(box_env)
    assert vllm.multicast_env(box_env) == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert not vllm.multicast_off({"NCCL_NVLS_ENABLE": "1", "PATH": "/usr/bin"})
    assert not vllm.multicast_off({})


def test_wheels_newer_than_the_box_glibc_are_refused_by_name(tmp_path):
    d = doc(None)
    d["files"] = [{"path": "wheels/fast-1.0-cp312-cp312-manylinux_2_39_x86_64.whl", "size": 1, "sha256": "0" * 64},
                  {"path": "wheels/old-1.0-cp39-cp39-manylinux_2_40_x86_64.whl", "size": 1, "sha256": "0" * 64},
                  {"path": "wheels/multi-1.0-py3-none-manylinux2014_x86_64.manylinux_2_34_x86_64.whl", "size": 1,
                   "sha256": "0" * 64}]
    assert box_preflight.wheels_glibc(d, "3.12.3") == ("2.39", "fast-1.0-cp312-cp312-manylinux_2_39_x86_64.whl")
    hw = replace(device_box(), glibc="2.35")
    with pytest.raises(BundlerError) as e:
        box_preflight.preflight(d, hw, layout(tmp_path))
    assert "fast-1.0-cp312-cp312-manylinux_2_39_x86_64.whl needs glibc >= 2.39, this box has 2.35" in e.value.message
    box_preflight.preflight(d, replace(device_box(), glibc="2.39"), layout(tmp_path))


def _wheel(dest: Path, name: str, version: str, body: str) -> Path:
    """A minimal pure-Python wheel, written by hand (pip installs it offline)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}.py": body,
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()}"
                     f",{len(t.encode())}\n" for p, t in files.items())
    files[f"{name}-{version}.dist-info/RECORD"] = record + f"{name}-{version}.dist-info/RECORD,,\n"
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, t in files.items():
            z.writestr(p, t)
    return path


def test_vllm_wheels_install_once_per_lock_and_a_failed_install_leaves_nothing(tmp_path):
    import hashlib

    bundle = tmp_path / "bundle"
    wheels = bundle / "engines" / "vllm" / "wheels"
    wheels.mkdir(parents=True)
    whl = _wheel(wheels, "tinyengine", "1.0", "SERVES = True\n")
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    (bundle / "engines" / "vllm" / "requirements.lock").write_text(f"tinyengine==1.0 --hash=sha256:{digest}\n")
    engine = {"name": "vllm", "dir": "engines/vllm", "version": "0.0", "lock": {"carried": 1, "reused": 0}}
    lay = layout(tmp_path)

    def doc():  # the manifest's record of the lock (the box copies it while hashing it)
        lock = bundle / "engines" / "vllm" / "requirements.lock"
        return {"files": [{"path": "engines/vllm/requirements.lock", "size": lock.stat().st_size,
                           "sha256": hashlib.sha256(lock.read_bytes()).hexdigest()}]}

    site = box_release.engine_site(bundle, doc(), engine, lay)
    assert (site / "tinyengine.py").read_text() == "SERVES = True\n"
    whl.unlink()  # a second release with the same lock must not need the wheels again
    assert box_release.engine_site(bundle, doc(), engine, lay) == site

    # another lock whose wheel does not match its hash: refused, and no half-installed engine is left
    bad = _wheel(wheels, "tinyengine", "1.1", "SERVES = False\n")
    (bundle / "engines" / "vllm" / "requirements.lock").write_text(f"tinyengine==1.1 --hash=sha256:{'0' * 64}\n")
    with pytest.raises(BundlerError) as e:
        box_release.engine_site(bundle, doc(), engine, lay)
    assert "is not one" in e.value.message and bad.name in e.value.message
    assert bad.exists()
    assert sorted(p.name for p in lay.engines.iterdir()) == [site.parent.name]


def test_vllm_launch_keeps_compiled_kernels_in_the_prefix_or_systemds_cache_directory(tmp_path):
    import subprocess

    from bundler.engines import vllm
    from bundler.render import render

    env_file = tmp_path / "b.env"
    env_file.write_text("LLAMA_API_KEY=k\n")
    launch = tmp_path / "launch"
    launch.write_text(render("launch.sh.j2", {"engine": "vllm", "name": "b", "release": "r", "env_file": str(env_file),
                                              "argv": ["/usr/bin/env"], "lib_dir": "", "extra_env": {},
                                              "cache_dir": str(tmp_path / "cache"), "cache_vars": vllm.CACHE_VARS,
                                              "banner": ""}))

    def seen(**extra):
        env = {"PATH": "/usr/bin:/bin", **extra}
        out = subprocess.run(["sh", str(launch)], capture_output=True, text=True, env=env, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    as_process = seen()
    assert as_process["VLLM_CACHE_ROOT"] == str(tmp_path / "cache" / "vllm")
    assert as_process["FLASHINFER_WORKSPACE_BASE"] == str(tmp_path / "cache")
    assert as_process["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    as_unit = seen(CACHE_DIRECTORY="/var/cache/airgap-llm-b")
    assert as_unit["VLLM_CACHE_ROOT"] == "/var/cache/airgap-llm-b/vllm"
    assert "LLAMA_API_KEY" not in as_unit  # the key comes from systemd or the supervisor, never the script


def test_a_wheel_swapped_after_its_check_is_never_installed(tmp_path):
    """The installer hashed a wheel in the bundle, then unpacked it from the bundle again: whoever
    owned the folder swapped it in between, and root ran the planted code at every start. What is
    unpacked now is the copy that was hashed."""
    import hashlib

    from bundler.box import wheels

    folder = tmp_path / "bundle" / "wheels"
    folder.mkdir(parents=True)
    whl = _wheel(folder, "tinyengine", "1.0", "SERVES = True\n")
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"tinyengine==1.0 --hash=sha256:{hashlib.sha256(whl.read_bytes()).hexdigest()}\n")
    chosen = wheels.select(lock, folder, tmp_path / "copies")
    assert [p.parent for p in chosen] == [tmp_path / "copies"]
    planted = _wheel(tmp_path, "tinyengine", "1.0", "SERVES = 'planted'\n")
    whl.write_bytes(planted.read_bytes())  # swapped between the check and the unpacking
    wheels.install(chosen, tmp_path / "site")
    assert (tmp_path / "site" / "tinyengine.py").read_text() == "SERVES = True\n"


def test_the_installer_takes_the_manifest_bootstrap_checked_and_a_plain_name_only(tmp_path, monkeypatch):
    """--uninstall read manifest.json again, unchecked: a swapped one named a folder outside the prefix,
    and root removed it. The installer reads bootstrap.py's checked copy, and a name must be plain."""
    import json

    from bundler.box import boot
    from tests.unit.test_contract import DOC

    bundle, stage = tmp_path / "bundle", tmp_path / "airgap-llm-boot-x"
    bundle.mkdir()
    stage.mkdir(mode=0o700)
    (stage / "manifest.json").write_text(json.dumps(dict(DOC, name="checked")))
    (bundle / "manifest.json").write_text(json.dumps(dict(DOC, name="swapped")))
    monkeypatch.setenv("AIRGAP_LLM_BOOT_DIR", str(stage))
    assert boot.manifest(bundle)[0]["name"] == "checked"
    for bad in ("../../victim", "/etc", "a/b", ".hidden", ""):
        (stage / "manifest.json").write_text(json.dumps(dict(DOC, name=bad)))
        with pytest.raises(BundlerError, match="not a plain name"):
            boot.manifest(bundle)
    stage.chmod(0o755)  # a folder others could have changed is not taken for bootstrap.py's
    with pytest.raises(BundlerError, match="not the private folder"):
        boot.manifest(bundle)


@pytest.mark.parametrize("host, ip", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("10.1.2.3", "10.1.2.3")])
def test_vllm_starts_with_its_host_ip_set_so_it_looks_nothing_up(host, ip, tmp_path, monkeypatch):
    """vLLM's get_ip() opens a UDP socket towards 8.8.8.8 and, with no route, falls back to 0.0.0.0 after
    two reverse lookups of '0.0.0.0.in-addr.arpa': the egress audit failed the GPU install on them."""
    from bundler import planner
    from bundler.box import release
    from bundler.box.layout import Layout

    monkeypatch.setattr(release, "engine_site", lambda *a: tmp_path / "site")
    monkeypatch.setattr(release, "triton_toolchain", lambda *a, **k: {"cc": "/usr/bin/cc", "headers": "",
                                                                        "flashinfer_jit": ""})
    (tmp_path / "stage" / "bin").mkdir(parents=True)
    plan = planner.Plan(engine="vllm", backend="cuda", model="m", threads=0, slots=8, context_per_slot=4096,
                        gpu_layers=0, total_layers=32, max_model_len=4096, max_num_seqs=256,
                        gpu_memory_utilization=0.9)
    doc = {"engines": [{"name": "vllm", "backend": "cuda", "dir": "engines/vllm", "version": "0.26.0"}], "files": []}
    script = release._engine_script(tmp_path / "bundle", doc, {"name": "m", "file": "/srv/m", "on_box": True}, plan,
                                    Layout(tmp_path / "p", tmp_path / "etc", "svc"), "r1", tmp_path / "final",
                                    tmp_path / "stage", host, 8000, False, {})
    assert f"VLLM_HOST_IP={ip}" in script.replace("'", "")
    assert "VLLM_NO_USAGE_STATS=1" in script.replace("'", "")
