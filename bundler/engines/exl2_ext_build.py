#!/usr/bin/env python3
"""Build ExLlamaV2's CUDA extension (exllamav2_ext) as a wheel, on the connected side, for a box's
Python, torch and GPU architectures, so the box never compiles it (exllamav2 from PyPI compiles it
at first import with nvcc, gcc and ninja, which a bare box lacks). Issue #14, a first step.

Run it with a Python of the box's version in which the box's torch is installed (same version and
CUDA build: e.g. PyPI's torch 2.11.0 is 2.11.0+cu130, the GPU box's), with nvcc of that CUDA:

    python3.12 -m venv v && v/bin/pip install torch==2.11.0 ninja setuptools wheel
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 v/bin/python exl2_ext_build.py exllamav2-0.3.2-py3-none-any.whl OUT

The sources are the ones exllamav2's own wheel carries (it JIT-compiles them); the list and the
flags are read from its ext.py, so the result is what its first import would have built. The
wheel holds the one module `exllamav2_ext`, which exllamav2 imports before trying to compile.

`make bundle` runs this file, with the Python of a venv it makes for the purpose (exllama.ext_wheel); it
imports nothing of airgap-llm.
"""

import ast
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def sources_from_ext(ext_py: str) -> list[str]:
    """The `sources_ = [...]` list of exllamav2/ext.py."""
    m = re.search(r"sources_\s*=\s*\\?\s*(\[.*?\])", ext_py, re.S)
    if not m:
        sys.exit("exllamav2/ext.py: no sources_ list found (another exllamav2 layout?)")
    return ast.literal_eval(m.group(1))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheel, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    import torch

    version = re.search(r"exllamav2-([^-]+)-", wheel.name).group(1)
    tag = f"{version}+cu{torch.version.cuda.replace('.', '')}.torch{torch.__version__.split('+')[0]}"
    with tempfile.TemporaryDirectory(prefix="exl2-build-") as td:
        src = Path(td)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(src)
        ext_dir = src / "exllamav2" / "exllamav2_ext"
        # the CUDA libraries' headers torch's own headers include (cusparse.h, cublas_v2.h, ...): from
        # NVIDIA's wheels beside torch, where the CUDA toolkit here is only the compiler
        site = Path(torch.__file__).resolve().parents[1]
        includes = [str(ext_dir), *map(str, sorted(site.glob("nvidia/*/include")))]
        sources = [str(ext_dir / s) for s in sources_from_ext((src / "exllamav2" / "ext.py").read_text())]
        (src / "setup.py").write_text(f"""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension
setup(name="exllamav2_ext", version={tag!r}, py_modules=[],
      ext_modules=[CUDAExtension("exllamav2_ext", {sources!r}, include_dirs={includes!r},
                                 extra_compile_args={{"cxx": ["-Ofast"], "nvcc": ["-lineinfo", "-O3"]}})],
      cmdclass={{"build_ext": BuildExtension}})
""")
        env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
        subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "--dist-dir", str(out)], cwd=src, env=env,
                       check=True)
    print(*sorted(str(p) for p in out.glob("exllamav2_ext-*.whl")), sep="\n")


if __name__ == "__main__":
    main()
