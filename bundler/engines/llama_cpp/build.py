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

import platform
import re
import shutil
import tempfile
from typing import Any

from ... import lock, manifest
from ...cache import cache_root
from ...errors import BundlerError
from ...staging import staged_dir
from ...toolchains import CUBLAS_REQ, CUDART_REQ, ZIG_VERSION, cuda_wheel_root, zig_toolchain
from ...versions import version_tuple
from . import CPU_GLIBC_TARGET, CPU_VARIANTS, CUDA_CPU_LEVEL, NAME

SPEC_TABLES = ("llama_cpp",)


@dataclass(frozen=True)
class LlamaCppSpec:
    """[engines.llama_cpp]: the llama-cpp-python sdist whose vendored llama.cpp is built, per backend."""

    sdist: str = "llama-cpp-python==0.3.36"
    sha256: str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
    backends: tuple[str, ...] = ("cpu",)
    cuda_archs: str = ""  # e.g. "90"; default: the target's GPUs, else 80;86;89;90


def read_spec(table: str, r: Any, path: Path) -> LlamaCppSpec:
    d = LlamaCppSpec()
    sdist = r.get("sdist", str, d.sdist)
    if not re.match(r"^llama-cpp-python==\S+$", sdist):
        r.fail("engines.llama_cpp.sdist", f"{sdist!r} must be llama-cpp-python==VERSION",
               "pin the sdist whose vendored llama.cpp is built")
    lsha = r.get("sha256", str, d.sha256 if sdist == d.sdist else ...,
                 hint="a different sdist needs its sha256: pip download --no-binary :all: --no-deps "
                 f"{sdist} and sha256sum it")
    backends = tuple(r.get("backends", list, list(d.backends)))
    for b in backends:
        if b not in ("cpu", "cuda"):
            r.fail("engines.llama_cpp.backends", f"has {b!r}", "use \"cpu\" and/or \"cuda\"")
    archs = r.get("cuda_archs", str, "")
    if archs and not re.match(r"^[0-9]{2,3}[af]?(;[0-9]{2,3}[af]?)*$", archs):
        r.fail("engines.llama_cpp.cuda_archs", f"is {archs!r}", "write CMake CUDA architectures, e.g. \"90\" or "
               "\"80;86;89;90\"")
    return LlamaCppSpec(sdist=sdist, sha256=lsha.lower(), backends=backends, cuda_archs=archs)


def lacks(configs: dict[str, Any], m: Any) -> tuple[str, str] | None:
    """Why the spec bundles no llama.cpp for a GGUF model (None: it does)."""
    if configs["llama_cpp"].backends:
        return None
    return ("GGUF, which only llama.cpp serves, and [engines.llama_cpp] backends is empty",
            'build it: backends = ["cpu"] (and/or "cuda"), or bundle a safetensors build of the model for vLLM')


NEEDS_BOX = False  # built here for any x86-64 box (CPU) or any CUDA 13 one


def wanted(spec: Any) -> bool:
    return bool(spec.llama_cpp.backends)


def offers(spec: Any) -> list[str]:
    """The names the planner knows its builds by: one per backend."""
    return list(spec.llama_cpp.backends)


def describe(spec: Any) -> str:
    return f"llama.cpp ({', '.join(spec.llama_cpp.backends)})"


def bundle(ctx: Any) -> list[dict[str, Any]]:
    """One llama-server build per backend of the spec, with the libraries it loads."""
    spec, out = ctx.spec, []
    for backend in spec.llama_cpp.backends:
        ctx.step(f"llama-server ({backend})")
        sdist = fetch_sdist(spec, ctx.log)
        archs = cuda_archs(spec, ctx.target) if backend == "cuda" else ""
        b = build(sdist, spec.llama_cpp.sha256, backend, archs, log=ctx.log)
        ctx.log(f"llama-server ({backend}): {'cached build' if b.cached else f'built in {b.seconds:.0f}s'} ({b.path})")
        edir = ctx.stage / "engines" / f"llama.cpp-{backend}"
        # cpu: one static binary per x86 instruction-set level (bin/llama-server-LEVEL); cuda: bin/llama-server
        own = sorted(f for f in (b.path / "bin").iterdir() if f.is_file() and f.name.startswith("llama-server"))
        for f in own:
            ctx.link(f, edir / "bin" / f.name)
        variants = sorted(f.name[len("llama-server-"):] for f in own if f.name.startswith("llama-server-"))
        binary = b.path / "bin" / ("llama-server-x64" if "x64" in variants else "llama-server")
        libs = ctx.shared_libs(binary)
        for lib in libs:  # e.g. libgomp: carried so the box needs no compiler runtime
            (edir / "lib").mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib.resolve(), edir / "lib" / lib.name)
        shutil.copy2(b.path / "build.json", edir / "build.json")
        box_lib_dirs: list[str] = []
        if backend == "cuda":
            box_lib_dirs = cuda_runtime(ctx.target, ctx.reuse_installed, edir / "lib", ctx.log)
        out.append({
            "box_lib_dirs": box_lib_dirs, "cuda_archs": archs, "cuda": "13" if backend == "cuda" else "",
            "name": NAME, "backend": backend, "dir": f"engines/llama.cpp-{backend}",
            "binary": f"engines/llama.cpp-{backend}/bin/{binary.name}",
            "libs": [lib.name for lib in libs], "glibc": max((ctx.glibc_needed(f) for f in own), key=version_tuple),
            "arch": platform.machine(),
            # the installer runs the best level the box's CPU has; the baseline one runs on any x86-64
            "cpu_variants": variants,
            # the one level a CUDA build's CPU side is compiled for: the box's CPU must have these
            "cpu_flags": list(CPU_VARIANTS[CUDA_CPU_LEVEL]) if backend == "cuda" else [],
            "source": spec.llama_cpp.sdist, "source_sha256": spec.llama_cpp.sha256,
        })
    return out


def fetch_sdist(spec: Any, log) -> Path:
    name, version = spec.llama_cpp.sdist.split("==", 1)
    dest = lock.wheel_cache() / "sdists"
    dest.mkdir(parents=True, exist_ok=True)
    fname = f"{name.replace('-', '_')}-{version}.tar.gz"
    path = dest / fname
    if path.is_file() and manifest.sha256_file(path) == spec.llama_cpp.sha256:
        return path
    with tempfile.TemporaryDirectory() as td:
        req = Path(td) / "sdist.txt"
        req.write_text(f"{spec.llama_cpp.sdist} --hash=sha256:{spec.llama_cpp.sha256}\n")
        log(f"downloading {spec.llama_cpp.sdist} sdist (hash-checked by pip)")
        lock._run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"--no-binary={name}",
                   "--require-hashes", "--dest", td, "-r", str(req)],
                  f"downloading {spec.llama_cpp.sdist}",
                  "check engines.llama_cpp.sdist and sha256 in the spec")
        got = list(Path(td).glob("*.tar.gz"))
        if not got:
            raise BundlerError(f"pip saved no sdist for {spec.llama_cpp.sdist}", hint="check the version exists")
        os.replace(got[0], path)
    return path


def cuda_archs(spec: Any, target: Any) -> str:
    if spec.llama_cpp.cuda_archs:
        return spec.llama_cpp.cuda_archs
    if target is not None and target.gpus:
        return ";".join(sorted({g.compute_capability.replace(".", "") for g in target.gpus}))
    return "80;86;89;90"


def cuda_runtime(target: Any, reuse_installed: bool, lib_dir: Path, log) -> list[str]:
    """CUDA runtime and cuBLAS for the CUDA llama-server: the box's own copies (from its
    python's NVIDIA wheels) with reuse_installed, else carried from NVIDIA's wheels."""
    if reuse_installed and target is not None:
        have = {k.lower(): v for k, v in target.installed.items()}
        if have.get("nvidia-cublas", "").startswith("13.") and have.get("nvidia-cuda-runtime", "").startswith("13."):
            dirs = [f"{sp}/nvidia/cu13/lib" for sp in target.site_packages]
            log(f"CUDA runtime and cuBLAS: reusing the box's (nvidia-cublas {have['nvidia-cublas']}) in {dirs[0]}")
            return dirs
    root, _ = cuda_wheel_root([CUBLAS_REQ, CUDART_REQ], log=log)
    lib_dir.mkdir(parents=True, exist_ok=True)
    for pattern in ("libcudart.so.*", "libcublas.so.*", "libcublasLt.so.*"):
        for so in (root / "lib").glob(pattern):
            shutil.copy2(so, lib_dir / so.name)
    log("CUDA runtime and cuBLAS: carried from NVIDIA's wheels")
    return []


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
