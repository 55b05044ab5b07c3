"""vLLM for safetensors models on NVIDIA GPUs.

Bundle side: lock vLLM for the box's Python and platform with `uv pip compile`
(pip-compile cannot lock for another interpreter), keeping the box's CUDA stack
(torch, triton, nvidia-*) at the versions it has, then preferring every other
version the box already has; only what the box lacks is downloaded and carried.
Box side: those wheels go into the release (`pip install --target`) and vLLM
runs on the box's own python with PYTHONPATH pointing there (a venv with
--system-site-packages does not see a venv's torch; DESIGN.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BundlerError

NAME = "vllm"
FORMATS = ("safetensors",)
DEFAULT_VERSION = "0.26.0"  # the newest that pins torch 2.11.0 (DESIGN.md)
GPU_STACK = ("torch", "torchvision", "torchaudio", "triton", "nvidia-")
# Flags that avoid the all-reduce paths which crashed with tensor parallel where
# NVLink multicast is off (VMs, PCIe cards, the GPU test boxes): vLLM's custom
# all-reduce, and the all-reduce + RMSNorm fusion of its compiler. On 2×H200 with
# vLLM 0.26.0, TP 2 died with "illegal memory access" in torch's symmetric-memory
# all-reduce right after "Enabled custom fusions: allreduce_rms" (docs/BENCHMARKS.md);
# DESIGN.md saw the same class of crash with 0.33, whose switch is named differently.
def safe_tp_flags(version: str) -> list[str]:
    from ..planner import version_tuple

    key = "fuse_allreduce_rms" if version_tuple(version)[:2] < (0, 33) else "enable_fi_allreduce_fusion"
    return ["--disable-custom-all-reduce", "--compilation-config", f'{{"pass_config": {{"{key}": false}}}}']


# Log lines after which a starting vLLM never becomes healthy (its API server can
# hang on after the engine died, so the process alone does not tell).
FATAL_LOG = ("Engine core initialization failed", "an illegal memory access was encountered",
             "CUBLAS_STATUS_INTERNAL_ERROR", "Worker failed with error", "CUDA out of memory")
# Where these say NVLink multicast is off (shared GPU hosts, VMs), TP > 1 starts with the safe flags at
# once instead of after a crash, and the launch script keeps them for the service (a systemd unit
# does not inherit the installer's environment).
MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_env(environ: dict[str, str]) -> dict[str, str]:
    """The multicast switches set in `environ`, to pass on to the engine."""
    return {k: environ[k] for k in MULTICAST_ENV if k in environ}


def multicast_off(environ: dict[str, str]) -> bool:
    return any(environ.get(k, "").strip() == off for k, off in MULTICAST_ENV.items())


# Compiled kernels go under one cache directory, not the HOME of whoever started the engine: vLLM's
# first start JIT-compiles for minutes (FlashInfer, Triton, torch.compile) and every later release on
# the box reuses them. Variable → subdirectory of that cache.
CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "FLASHINFER_WORKSPACE_BASE": "", "TRITON_CACHE_DIR": "triton",
              "TORCHINDUCTOR_CACHE_DIR": "inductor"}


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _uv() -> list[str]:
    exe = shutil.which("uv", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe:
        return [exe]
    try:
        import uv  # type: ignore[import-not-found]

        return [uv.find_uv_bin()]
    except ImportError:
        raise BundlerError("uv is needed to lock vLLM for another Python", hint="pip install -e '.[bundle]'")


def _compile(requirement: str, constraints: dict[str, str], python: str, platform_tag: str, out: Path) -> str:
    req = out.with_suffix(".in")
    req.write_text(requirement + "\n")
    con = out.with_suffix(".constraints")
    con.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
    proc = subprocess.run([*_uv(), "pip", "compile", str(req), "-c", str(con), "--python-version", python,
                           "--python-platform", platform_tag, "--generate-hashes", "--no-header", "--no-annotate",
                           "--quiet", "-o", str(out)], capture_output=True, text=True)
    return "" if proc.returncode == 0 else (proc.stdout + proc.stderr)


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """name → (version, [hash lines]) from a --generate-hashes lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        m = PIN_RE.match(line)
        if m:
            current = _norm(m.group(1))
            pins[current] = (m.group(2), [])
        elif current and "--hash=" in line:
            pins[current][1].extend(re.findall(r"--hash=sha256:[0-9a-f]{64}", line))
    return pins


def lock_for_box(version: str, box: Any, workdir: Path, log=print) -> tuple[dict[str, tuple[str, list[str]]], dict]:
    """Lock vllm==version for the box; return (pins to carry, summary)."""
    return lock_requirements([f"vllm=={version}"], box, workdir, f"vllm=={version}", log=log,
                             hint="pick a vLLM version that pins the box's torch (vLLM 0.26.0 pins torch 2.11.0)")


def lock_requirements(requirements: list[str], box: Any, workdir: Path, label: str, log=print,
                      hint: str = "") -> tuple[dict[str, tuple[str, list[str]]], dict]:
    """Lock requirements for the box's Python and platform, keeping its CUDA stack (torch, triton,
    nvidia-*) as it is and preferring every other version it has; return (pins to carry, summary)."""
    python = ".".join(box.python.split(".")[:2])
    glibc_minor = int(box.glibc.split(".")[1]) if "." in box.glibc else 17
    platform_tag = f"{box.arch}-manylinux_2_{min(glibc_minor, 40)}"
    installed = {_norm(k): v for k, v in box.installed.items()}
    hard = {k: v for k, v in installed.items() if k.startswith(GPU_STACK)}
    out = workdir / "engine.lock"
    requirement = "\n".join(requirements)
    log(f"locking {label} for Python {python} on {platform_tag} (uv), keeping the box's "
        f"torch {installed.get('torch', '?')} stack")
    err = _compile(requirement, hard, python, platform_tag, out)
    if err:
        raise BundlerError(f"cannot lock {label} against the box's CUDA stack:\n{err[-1500:]}",
                           hint=hint or "pick versions that work with the box's torch")
    pins = parse_lock(out.read_text())
    # prefer what the box has: constrain every other package it has at another version
    prefer = dict(hard)
    prefer.update({n: installed[n] for n, (v, _) in pins.items() if n in installed and installed[n] != v})
    out2 = workdir / "engine-reuse.lock"
    for _ in range(5):  # drop the preferences the resolver names as conflicting, then try again
        if len(prefer) == len(hard):
            break
        err = _compile(requirement, prefer, python, platform_tag, out2)
        if not err:
            pins = parse_lock(out2.read_text())
            break
        named = {n for n in prefer if n not in hard and re.search(rf"\b{re.escape(n)}\b", err.lower())}
        if not named:
            break
        for n in named:
            del prefer[n]
    carry = {n: p for n, p in pins.items() if installed.get(n) != p[0]}
    summary = {"python": python, "platform": platform_tag, "resolved": len(pins), "reused": len(pins) - len(carry),
               "carried": len(carry)}
    # the box's CUDA stack packages the engine imports: the installer refuses a box whose versions moved
    stack = {n for n in pins if n not in carry and n.startswith(GPU_STACK)}
    summary["reuses"] = {k: v for k, v in box.installed.items() if _norm(k) in stack}
    log(f"{label} lock: {len(pins)} packages, {len(pins) - len(carry)} already on the box, {len(carry)} to carry")
    return carry, summary


def download(carry: dict[str, tuple[str, list[str]]], box: Any, dest: Path, log=print) -> list[Path]:
    """Fetch the carried pins as wheels for the box (pip checks every hash)."""
    from .. import lock

    python = ".".join(box.python.split(".")[:2])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="airgap-vllm-") as td:
        req = Path(td) / "carry.txt"
        req.write_text("".join(f"{n}=={v} {' '.join(h)}\n" for n, (v, h) in sorted(carry.items())))
        nodot = python.replace(".", "")
        glibc_minor = int(box.glibc.split(".")[1]) if "." in box.glibc else 17
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--dest", str(dest), "-r", str(req), "--python-version", python,
               "--implementation", "cp", "--abi", f"cp{nodot}", "--abi", "abi3", "--abi", "none"]
        for n in range(17, glibc_minor + 1):
            cmd += ["--platform", f"manylinux_2_{n}_{box.arch}"]
        cmd += ["--platform", f"manylinux2014_{box.arch}", "--platform", f"linux_{box.arch}"]
        log(f"downloading {len(carry)} wheels for the box (hash-checked by pip)")
        lock._run(cmd, "pip download of the engine's wheels", "a pin may have no wheel for the box's Python/platform")
    return lock.files_for([(n, v) for n, (v, _) in carry.items()], dest)


def launch_argv(python: str, model_path: str, name: str, host: str, port: int, plan, safe: bool,
                version: str = DEFAULT_VERSION) -> list[str]:
    # `vllm serve` itself (its CLI module): what a user runs by hand, so the plan starts from the same
    # defaults, e.g. one API server process per data-parallel replica (the bare api_server module
    # runs one for all of them)
    argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", model_path, "--served-model-name", name,
            "--host", host, "--port", str(port)]
    if plan.engine_defaults:  # `vllm serve MODEL` (the key from VLLM_API_KEY, as vLLM reads it): a reference
        return argv
    argv += ["--tensor-parallel-size", str(plan.tensor_parallel),
             "--data-parallel-size", str(plan.data_parallel), "--max-model-len", str(plan.max_model_len),
             "--max-num-seqs", str(plan.max_num_seqs), "--gpu-memory-utilization", str(plan.gpu_memory_utilization),
             "--uvicorn-log-level", "warning",
             # vLLM's own key guards /v1 only: every route but /health behind it (vllm_auth.py)
             "--middleware", "bundler.engines.vllm_auth.KeyOnEveryRoute"]
    if plan.task == "embed":  # /v1/embeddings: vLLM's pooling runner (a causal LM is converted to embed)
        argv += ["--runner", "pooling"]
    if getattr(plan, "api_servers", 0) > 1:
        argv += ["--api-server-count", str(plan.api_servers)]
    argv += list(plan.extra_args)
    if safe and plan.tensor_parallel > 1:
        argv += safe_tp_flags(version)
    return argv
