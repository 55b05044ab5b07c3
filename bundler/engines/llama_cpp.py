"""llama.cpp's own llama-server: builds it (bundle side) and launches it (box side).

The binary is built from the llama.cpp sources vendored in a pinned
llama-cpp-python sdist (DESIGN.md: llama-cpp-python's own server serialises
requests; llama-server batches continuously). Builds are slow (about 4 minutes
on 2 cores for the CPU variant, 19 for CUDA), so each is cached outside the clone
under a key over every input: the sdist's sha256, backend, CUDA architectures,
the compiler and the build script itself.

The CPU variant is compiled by Zig's clang (a pinned, hash-checked wheel) against
the symbols of glibc 2.28, so it runs on RHEL 8/9, Ubuntu 20.04/22.04 and Debian 10+
as well as here (built by this machine's gcc it needed glibc 2.36, which refused
most enterprise distributions). The CUDA variant keeps gcc: nvcc needs it as host
compiler, and GPU boxes with a CUDA 13 driver run recent distributions.
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

from .. import lock
from ..cache import cache_root
from ..errors import BundlerError
from ..staging import staged_dir

BUILD_SCRIPT = Path(__file__).with_name("build_llama_server.sh")
FORMATS = ("gguf",)
NAME = "llama.cpp"


# Zig 0.17.1 from its PyPI wheel, one hash per build architecture.
ZIG_VERSION = "0.17.1"
ZIG_WHEEL_SHA256 = {
    "x86_64": "ea6cc5d87b033cf0aedfbc8f9549a908cae6c50ac31f1698188fa48a74524b54",
    "aarch64": "b7c5f02fccd40f89b999ee16a1f5ddced56e6182370f8affe494bcf8a28cf07e",
}
CPU_GLIBC_TARGET = "2.28"
# No OpenMP runtime with Zig (ggml's own thread pool serves instead: as fast on a CPU box,
# measured with the gcc build); libc++ is linked in statically by Zig itself.
CPU_CMAKE_ARGS = "-DGGML_OPENMP=OFF -DCMAKE_EXE_LINKER_FLAGS="


def zig_wheel(arch: str, log=print) -> Path:
    """The pinned Zig wheel for `arch` (x86_64, aarch64), downloaded once, hash-checked."""
    from ..manifest import sha256_file

    sha = ZIG_WHEEL_SHA256.get(arch)
    if sha is None:
        raise BundlerError(f"no pinned Zig wheel for {arch}", hint="build on x86_64 or aarch64")
    wheels = lock.wheel_cache() / "toolchains"
    found = [w for w in wheels.glob(f"ziglang-{ZIG_VERSION}-*{arch}*.whl") if sha256_file(w) == sha]
    if not found:
        with tempfile.TemporaryDirectory(prefix="airgap-zig-") as td:
            req = Path(td) / "zig.txt"
            req.write_text(f"ziglang=={ZIG_VERSION} --hash=sha256:{sha}\n")
            log(f"downloading Zig {ZIG_VERSION} for {arch} (hash-checked)")
            lock._run([sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
                       "--only-binary=:all:", "--platform", f"manylinux_2_12_{arch}", "--dest", str(wheels), "-r",
                       str(req)], "pip download of the Zig wheel", "the index must be reachable for the first build")
        found = [w for w in wheels.glob(f"ziglang-{ZIG_VERSION}-*{arch}*.whl") if sha256_file(w) == sha]
    if not found:
        raise BundlerError(f"the Zig {ZIG_VERSION} wheel for {arch} with sha256 {sha} was not found",
                           hint=f"check {wheels}")
    return found[0]


def zig_toolchain(log=print) -> tuple[Path, str]:
    """Zig unpacked once from its hash-checked wheel, with cc/c++ wrappers that target glibc
    CPU_GLIBC_TARGET. Returns (directory holding cc and c++, a key over the wheel and target)."""
    import platform

    arch = platform.machine()
    sha = ZIG_WHEEL_SHA256.get(arch)
    if sha is None:
        raise BundlerError(f"no pinned Zig wheel for {arch}", hint="build on x86_64 or aarch64")
    key = hashlib.sha256(f"{sha} {arch}-linux-gnu.{CPU_GLIBC_TARGET}".encode()).hexdigest()[:16]
    root = cache_root() / "toolchains" / f"zig-{key}"
    if (root / ".done").is_file():
        return root, key
    wheel = zig_wheel(arch, log)
    with staged_dir(root) as tmp:
        _unzip(wheel, tmp, lambda parts: parts[1:] if parts[0] == "ziglang" else None)
        (tmp / "zig").chmod(0o755)
        target = f"{arch}-linux-gnu.{CPU_GLIBC_TARGET}"
        for tool in ("cc", "c++"):
            (tmp / tool).write_text(f'#!/bin/sh\nexec "{root}/zig" {tool} -target {target} "$@"\n')
            (tmp / tool).chmod(0o755)
        (tmp / ".done").write_text(f"zig {ZIG_VERSION} {target}\n")
    return root, key


def _unzip(wheel: Path, dest: Path, place) -> None:
    """Extract the members of `wheel` that place(path parts) maps to a list of parts under dest."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = None if name.endswith("/") else place(name.split("/"))
            if rel:
                out_path = dest.joinpath(*rel)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(out_path, "wb") as out:
                    shutil.copyfileobj(src, out)


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


# cuBLAS headers and libraries for the CUDA build, and at run time on a box that lacks
# them: NVIDIA's wheel, hash-locked like every other wheel. CUDA 13 needs driver >= 580.
CUBLAS_REQ = "nvidia-cublas==13.0.2.14"
CUDART_REQ = "nvidia-cuda-runtime==13.0.96"
# No libcuda.so stub in a toolkit without a driver: build without CUDA virtual memory
# management (llama.cpp then uses its plain pool allocator; no need to link libcuda).
# Its CPU side (the layers a partial offload leaves on the CPU, sampling) is built for one level,
# named here rather than left to ggml's defaults (a SOURCE_DATE_EPOCH in the environment once
# turned every x86 option off): haswell, AVX2/FMA, which every CPU beside a CUDA 13 GPU has. The
# bundle records the flags, and the planner refuses the CUDA build on a CPU without them.
CUDA_CPU_LEVEL = "haswell"
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


def cuda_wheel_root(requirements: list[str], log=print) -> tuple[Path, str]:
    """Unpack NVIDIA's CUDA library wheels into one cached tree (include/, lib/ with .so links).
    Returns (root, a key over the wheels' sha256)."""
    from ..manifest import sha256_file

    with tempfile.TemporaryDirectory(prefix="airgap-cuda-") as td:
        lf = Path(td) / "cuda.lock"
        lock.compile_lock(requirements, lf)
        wheels = [w for w in lock.download(lf, lock.wheel_cache() / "cuda") if w.name.startswith("nvidia_")]
    key = hashlib.sha256("".join(sorted(sha256_file(w) for w in wheels)).encode()).hexdigest()[:16]
    root = cache_root() / "cuda-libs" / key
    if (root / ".done").is_file():
        return root, key
    with staged_dir(root) as tmp:
        for w in wheels:  # nvidia/<lib>/{include,lib}/... → include/..., lib/...
            log(f"unpacking {w.name}")
            _unzip(w, tmp, lambda p: p[2:] if len(p) >= 4 and p[0] == "nvidia" and p[2] in ("include", "lib")
                   else None)
        for so in (tmp / "lib").glob("*.so.*"):
            link = so.with_name(so.name.split(".so")[0] + ".so")
            if not link.exists():
                link.symlink_to(so.name)
        (tmp / ".done").write_text("\n".join(w.name for w in wheels) + "\n")
    return root, key


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


def launch_argv(binary: str, model_path: str, alias: str, host: str, port: int, plan) -> list[str]:
    """llama-server's command line for a Plan. The API key comes from the
    environment (LLAMA_API_KEY), never the command line, so `ps` cannot show it."""
    if getattr(plan, "engine_defaults", False):  # `llama-server -m MODEL` by hand: a reference, never installed
        return [binary, "--model", model_path, "--alias", alias, "--host", host, "--port", str(port)]
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
        # one KV buffer for every slot, as llama-server does when it picks the slots itself (with it
        # the plan matched or beat llama-server's defaults at 1, 4 and 50: docs/BENCHMARKS.md)
        "--kv-unified",
        "--no-webui",
        "--offline",
        "--metrics",
    ]
    if plan.gpu_layers:
        # 999: every layer and the output tensors; a smaller number offloads that many layers
        ngl = 999 if plan.gpu_layers >= plan.total_layers else plan.gpu_layers
        argv += ["--n-gpu-layers", str(ngl)]
    if getattr(plan, "single_gpu", False):
        argv += ["--split-mode", "none", "--main-gpu", "0"]
    if plan.tensor_split:
        argv += ["--split-mode", "layer", "--tensor-split", ",".join(str(x) for x in plan.tensor_split)]
    if getattr(plan, "task", "chat") == "embed":
        # /v1/embeddings; one input is one batch, so a batch holds a whole input of the planned length
        argv += ["--embedding", "--batch-size", str(plan.context_per_slot), "--ubatch-size", str(plan.context_per_slot)]
        if plan.pooling:
            argv += ["--pooling", plan.pooling]
    if plan.chat_template:
        # a built-in template's name: with jinja on (llama-server's default) --chat-template takes a
        # jinja template, so "gemma" itself became the prompt and the model never saw the question
        argv += ["--no-jinja", "--chat-template", plan.chat_template]
    return argv + list(getattr(plan, "extra_args", ()))


# ---- which CPU backend ggml loads on a box -----------------------------------------------
# The x86 variants GGML_CPU_ALL_VARIANTS builds, with the /proc/cpuinfo flags each needs, and
# ggml's own score for each flag (ggml-cpu/arch/x86/cpu-feats.cpp): at start ggml loads the
# variant with the highest score whose every flag the CPU has. The probe records the flags,
# so the plan can say which one will run before anything is installed.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
CPU_VARIANTS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "skylakex": _HASWELL + _AVX512,
    "cannonlake": _HASWELL + _AVX512 + ("avx512vbmi",),
    "cascadelake": _HASWELL + _AVX512 + ("avx512_vnni",),
    "icelake": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni"),
    "cooperlake": _HASWELL + _AVX512 + ("avx512_vnni", "avx512_bf16"),
    "zen4": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": _HASWELL + ("avx_vnni",),
    "sapphirerapids": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}
_SCORE = {"fma": 1, "f16c": 2, "sse4_2": 4, "bmi2": 8, "avx": 16, "avx2": 32, "avx_vnni": 64, "avx512f": 128,
          "avx512vbmi": 256, "avx512_bf16": 512, "avx512_vnni": 1024, "amx_int8": 2048}


def best_cpu_variant(cpu_flags: tuple[str, ...], variants: tuple[str, ...]) -> str:
    """The CPU backend ggml will load on a CPU with these flags, of the variants bundled ("" if none runs)."""
    have = set(cpu_flags)
    best, best_score = "", 0
    for v in variants:
        need = CPU_VARIANTS.get(v)
        if need is None or not set(need) <= have:
            continue
        score = 1 + sum(_SCORE.get(f, 0) for f in need)
        if score > best_score:
            best, best_score = v, score
    return best
