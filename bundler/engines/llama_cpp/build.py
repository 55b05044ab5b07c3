"""llama.cpp's llama-server, bundle side: built from the llama.cpp sources vendored in a pinned
llama-cpp-python sdist (llama-cpp-python's own server serialises requests; llama-server batches
continuously). Builds are slow (about 4 minutes on 2 cores for the CPU variant, 19 for CUDA), so each
is cached outside the clone under a key over every input: the sdist's sha256, backend, CUDA
architectures, the compiler and the build script itself.

The CPU variant is compiled by Zig's clang (bundler/toolchains.py) against the symbols of glibc 2.28,
so it runs on RHEL 8/9, Ubuntu 20.04/22.04 and Debian 10+ as well as here. The CUDA variant keeps gcc:
nvcc needs it as host compiler, and GPU boxes with a CUDA 13 driver run recent distributions.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...cache import cache_root
from ...errors import BundlerError
from ...staging import staged_dir
from ...toolchains import CUBLAS_REQ, CUDART_REQ, ZIG_VERSION, cuda_wheel_root, zig_toolchain
from . import CPU_GLIBC_TARGET


BUILD_SCRIPT = Path(__file__).with_name("build_llama_server.sh")


# No OpenMP runtime with Zig (ggml's own thread pool serves instead: as fast on a CPU box,
# measured with the gcc build); libc++ is linked in statically by Zig itself.
CPU_CMAKE_ARGS = "-DGGML_OPENMP=OFF -DCMAKE_EXE_LINKER_FLAGS="


def _compiler_id(backend: str) -> str:
    if backend == "cpu":
        return f"zig {ZIG_VERSION} cc, glibc {CPU_GLIBC_TARGET}"
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


CUDA_CMAKE_ARGS = ("-DGGML_CUDA_NO_VMM=ON -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_AVX2=ON "
                   "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF")


def build_key(sdist_sha256: str, backend: str, cuda_archs: str = "", extra: str = "") -> str:
    h = hashlib.sha256()
    script = BUILD_SCRIPT.read_bytes()
    for item in (sdist_sha256, backend, cuda_archs, _compiler_id(backend), hashlib.sha256(script).hexdigest(),
                 extra):
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
    cublas, extra_key, env = "", "", None
    if backend == "cuda":
        root, extra_key = cuda_wheel_root([CUBLAS_REQ, CUDART_REQ], log=log)
        cublas = str(root)
        more = CUDA_CMAKE_ARGS
    else:
        zig, extra_key = zig_toolchain(log=log)
        more = CPU_CMAKE_ARGS
        env = dict(os.environ, CC=str(zig / "cc"), CXX=str(zig / "c++"),
                   ZIG_GLOBAL_CACHE_DIR=str(cache_root() / "toolchains" / "zig-cache"))
    key = build_key(sdist_sha256, backend, cuda_archs, extra_key + more)
    dest = cache_root() / "llama-server" / f"{backend}-{key}"
    if (dest / "build.json").is_file():  # written last, once every binary is in place
        return Build(dest, key, True, 0.0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(dest.parent / f"{backend}-{key}.lock", "w") as lockf:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building llama-server ({backend}) {key}; waiting for it")
            fcntl.flock(lockf, fcntl.LOCK_EX)
        if (dest / "build.json").is_file():  # written last, once every binary is in place
            return Build(dest, key, True, 0.0)
        return _build_locked(sdist, sdist_sha256, backend, cuda_archs, cublas, more, key, dest, log, env)


def _build_locked(sdist: Path, sdist_sha256: str, backend: str, cuda_archs: str, cublas: str, more: str, key: str,
                  dest: Path, log, env: dict[str, str] | None = None) -> Build:
    with staged_dir(dest) as tmp:  # the build appears as dest only when it succeeded
        log_path = dest.parent / f"{backend}-{key}.log"
        log(f"building llama-server ({backend}) from {sdist.name}; this takes ~{20 if backend == 'cuda' else 5} min on "
            f"2 cores and is cached; log: {log_path}")
        t0 = time.monotonic()
        cmd = ["sh", str(BUILD_SCRIPT), str(sdist), str(tmp), backend, cuda_archs, str(os.cpu_count() or 2), cublas,
               more]
        with open(log_path, "w") as lf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
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
            tail = "".join(log_path.read_text().splitlines(True)[-15:])
            raise BundlerError(f"building llama-server failed (exit {rc}):\n{tail}",
                               hint=f"full log: {log_path}; cmake, a C++ compiler and (for cuda) nvcc are needed")
        seconds = time.monotonic() - t0
        info = {"backend": backend, "cuda_archs": cuda_archs, "sdist": sdist.name, "sdist_sha256": sdist_sha256,
                "compiler": _compiler_id(backend), "seconds": round(seconds, 1), "key": key, "cuda_libs": cublas}
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        return Build(dest, key, False, seconds)
