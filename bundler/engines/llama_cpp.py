"""llama.cpp's own llama-server: builds it (bundle side) and launches it (box side).

The binary is built from the llama.cpp sources vendored in a pinned
llama-cpp-python sdist (DESIGN.md: llama-cpp-python's own server serialises
requests; llama-server batches continuously). Builds are slow (about 17 minutes
on 2 cores for the CPU variant), so each is cached outside the clone under a key
over every input: the sdist's sha256, backend, CUDA architectures, the compiler
and the build script itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundlerError

BUILD_SCRIPT = Path(__file__).with_name("build_llama_server.sh")
FORMATS = ("gguf",)
NAME = "llama.cpp"


def cache_root() -> Path:
    base = os.environ.get("AIRGAP_LLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "airgap-llm"
    )
    return Path(base)


def _compiler_id(backend: str) -> str:
    parts = []
    for cmd in (["c++", "--version"], ["nvcc", "--version"] if backend == "cuda" else None):
        if cmd is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            out = "missing"
        parts.append(out.strip().splitlines()[0] if out.strip() else "missing")
        if cmd[0] == "nvcc":
            parts.append(out.strip().splitlines()[-1] if out.strip() else "")
    return " | ".join(parts)


def build_key(sdist_sha256: str, backend: str, cuda_archs: str = "") -> str:
    h = hashlib.sha256()
    script = BUILD_SCRIPT.read_bytes()
    for item in (sdist_sha256, backend, cuda_archs, _compiler_id(backend), hashlib.sha256(script).hexdigest()):
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class Build:
    path: Path  # directory holding bin/llama-server and build.json
    key: str
    cached: bool
    seconds: float


def build(sdist: Path, sdist_sha256: str, backend: str = "cpu", cuda_archs: str = "", log=print) -> Build:
    """Build (or reuse from the cache) llama-server for `backend`."""
    key = build_key(sdist_sha256, backend, cuda_archs)
    dest = cache_root() / "llama-server" / f"{backend}-{key}"
    if (dest / "build.json").is_file() and (dest / "bin" / "llama-server").is_file():
        return Build(dest, key, True, 0.0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{backend}-{key}.", dir=dest.parent))
    log_path = dest.parent / f"{backend}-{key}.log"
    log(f"building llama-server ({backend}) from {sdist.name}; this takes ~20 min on 2 cores "
        f"and is cached; log: {log_path}")
    t0 = time.monotonic()
    cmd = ["sh", str(BUILD_SCRIPT), str(sdist), str(tmp), backend, cuda_archs, str(os.cpu_count() or 2)]
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            lf.write(line)
            if line.startswith("[") and "/" in line.split("]")[0]:
                # ninja/make progress "[12/345] ..." — show the counter only
                sys.stderr.write("\r  llama-server build " + line.split("]")[0] + "]")
                sys.stderr.flush()
        rc = proc.wait()
    sys.stderr.write("\n")
    if rc != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "".join(log_path.read_text().splitlines(True)[-15:])
        raise BundlerError(f"building llama-server failed (exit {rc}):\n{tail}",
                           hint=f"full log: {log_path}; cmake, a C++ compiler and (for cuda) nvcc are needed")
    seconds = time.monotonic() - t0
    info = {"backend": backend, "cuda_archs": cuda_archs, "sdist": sdist.name, "sdist_sha256": sdist_sha256,
            "compiler": _compiler_id(backend), "seconds": round(seconds, 1), "key": key}
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return Build(dest, key, False, seconds)


def launch_argv(binary: str, model_path: str, alias: str, host: str, port: int, plan) -> list[str]:
    """llama-server's command line for a Plan. The API key comes from the
    environment (LLAMA_API_KEY), never the command line, so `ps` cannot show it."""
    argv = [
        binary,
        "--model", model_path,
        "--alias", alias,
        "--host", host,
        "--port", str(port),
        "--parallel", str(plan.slots),
        "--ctx-size", str(plan.slots * plan.context_per_slot),
        "--threads", str(plan.threads),
        "--cont-batching",
        "--no-webui",
        "--offline",
        "--metrics",
    ]
    if plan.gpu_layers:
        # 999: every layer and the output tensors; a smaller number offloads that many layers
        ngl = 999 if plan.gpu_layers >= plan.total_layers else plan.gpu_layers
        argv += ["--n-gpu-layers", str(ngl)]
    if plan.tensor_split:
        argv += ["--split-mode", "layer", "--tensor-split", ",".join(str(x) for x in plan.tensor_split)]
    if plan.chat_template:
        argv += ["--chat-template", plan.chat_template]
    return argv
