"""Toolchains the bundler fetches from the package index, hash-pinned, for more than one engine:
Zig (the C compiler of the CPU llama-server, and the C compiler Triton needs on a box without one,
for vLLM and ExLlamaV3) and NVIDIA's CUDA runtime and cuBLAS wheels. Bundle side only.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from . import lock
from .cache import cache_root
from .errors import BundlerError
from .staging import staged_dir
from .engines.llama_cpp import CPU_GLIBC_TARGET


# Zig 0.17.1 from its PyPI wheel, one hash per build architecture.
ZIG_VERSION = "0.17.1"


ZIG_WHEEL_SHA256 = {
    "x86_64": "ea6cc5d87b033cf0aedfbc8f9549a908cae6c50ac31f1698188fa48a74524b54",
    "aarch64": "b7c5f02fccd40f89b999ee16a1f5ddced56e6182370f8affe494bcf8a28cf07e",
}


def zig_wheel(arch: str, log=print) -> Path:
    """The pinned Zig wheel for `arch` (x86_64, aarch64), downloaded once, hash-checked."""
    from .manifest import sha256_file

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


# cuBLAS headers and libraries for the CUDA build, and at run time on a box that lacks
# them: NVIDIA's wheel, hash-locked like every other wheel. CUDA 13 needs driver >= 580.
CUBLAS_REQ = "nvidia-cublas==13.0.2.14"


CUDART_REQ = "nvidia-cuda-runtime==13.0.96"


def cuda_wheel_root(requirements: list[str], log=print) -> tuple[Path, str]:
    """Unpack NVIDIA's CUDA library wheels into one cached tree (include/, lib/ with .so links).
    Returns (root, a key over the wheels' sha256)."""
    from .manifest import sha256_file

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
