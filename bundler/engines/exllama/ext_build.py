#!/usr/bin/env python3
"""Build ExLlama's CUDA extension (exllamav2_ext or exllamav3_ext) as a wheel, on the connected side,
for a box's Python, torch and GPU architectures, so the box never compiles it: exllamav2 and
exllamav3 from PyPI compile it at first import with nvcc, gcc and ninja, which a bare box lacks.

Run it with a Python of the box's version in which the box's torch is installed (same version and
CUDA build: e.g. PyPI's torch 2.11.0 is 2.11.0+cu130, the GPU box's), with nvcc of that CUDA:

    python3.12 -m venv v && v/bin/pip install torch==2.11.0 ninja setuptools wheel
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 v/bin/python exl_ext_build.py exllamav3-1.4.2-py3-none-any.whl OUT

The sources are the ones the package's own wheel carries (it JIT-compiles them) and the flags are
read from its ext.py, so the result is what its first import would have built. The wheel holds the
one module `exllamavN_ext`, which exllamavN imports before trying to compile.

`make bundle` runs this file, with the Python of a venv it makes for the purpose (exllama.ext_wheel); it
imports nothing of airgap-llm.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def v2_sources(pkg: Path) -> list[str]:
    """The `sources_ = [...]` list of exllamav2/ext.py."""
    m = re.search(r"sources_\s*=\s*\\?\s*(\[.*?\])", (pkg / "ext.py").read_text(), re.S)
    if not m:
        sys.exit("exllamav2/ext.py: no sources_ list found (another exllamav2 layout?)")
    return [str(pkg / "exllamav2_ext" / s) for s in ast.literal_eval(m.group(1))]


def v3_sources(pkg: Path) -> list[str]:
    """What exllamav3/ext.py compiles: every .c/.cpp/.cu under exllamav3_ext, less the ROCm-only
    folder and hipify's outputs (newer releases leave those out, older ones have none)."""
    base = pkg / "exllamav3_ext"
    out = []
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base).as_posix()
        if p.suffix not in (".c", ".cpp", ".cu") or rel.startswith("rocm/"):
            continue
        if "_hip." in p.name or p.name.endswith(".hip") or p.name.startswith("hip_"):
            continue
        out.append(str(p))
    return out


def v3_nvcc_flags(pkg: Path, cuda_home: str) -> list[str]:
    """exllamav3's nvcc flags: the literal list in its ext.py (≤ 1.4.x), else its util/cuda_flags.py."""
    m = re.search(r"extra_cuda_cflags\s*=\s*(\[[^\]]*\])", (pkg / "ext.py").read_text(), re.S)
    if m:
        return ast.literal_eval(m.group(1))
    spec = importlib.util.spec_from_file_location("exl3_cuda_flags", pkg / "util" / "cuda_flags.py")
    if spec is None or spec.loader is None:
        sys.exit("exllamav3/ext.py: no extra_cuda_cflags list and no util/cuda_flags.py (another layout?)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.cuda_cflags(cuda_home=cuda_home, debug=False, hip=False))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheel, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    m = re.match(r"(exllamav[23])-([^-]+)-", wheel.name)
    if not m:
        sys.exit(f"{wheel.name}: not an exllamav2 or exllamav3 wheel")
    name, version = m.groups()
    tag = f"{version}+cu{torch.version.cuda.replace('.', '')}.torch{torch.__version__.split('+')[0]}"
    with tempfile.TemporaryDirectory(prefix="exl-build-") as td:
        src = Path(td)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(src)
        pkg = src / name
        ext_dir = pkg / f"{name}_ext"
        # the CUDA libraries' headers torch's own headers include (cusparse.h, cublas_v2.h, ...): from
        # NVIDIA's wheels beside torch, where the CUDA toolkit here is only the compiler
        site = Path(torch.__file__).resolve().parents[1]
        includes = [str(ext_dir), *map(str, sorted(site.glob("nvidia/*/include")))]
        if name == "exllamav2":
            sources, nvcc = v2_sources(pkg), ["-lineinfo", "-O3"]
        else:
            sources, nvcc = v3_sources(pkg), v3_nvcc_flags(pkg, CUDA_HOME or "")
        (src / "setup.py").write_text(f"""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension
setup(name="{name}_ext", version={tag!r}, py_modules=[],
      ext_modules=[CUDAExtension("{name}_ext", {sources!r}, include_dirs={includes!r},
                                 extra_compile_args={{"cxx": ["-Ofast"], "nvcc": {nvcc!r}}})],
      cmdclass={{"build_ext": BuildExtension}})
""")
        print(f"{name}_ext {tag}: {len(sources)} sources, nvcc {' '.join(nvcc)}", flush=True)
        env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
        subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "--dist-dir", str(out)], cwd=src, env=env,
                       check=True)
    print(*sorted(str(p) for p in out.glob(f"{name}_ext-*.whl")), sep="\n")


if __name__ == "__main__":
    main()
