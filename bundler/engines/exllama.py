"""ExLlama behind TabbyAPI, its own OpenAI-compatible server, on NVIDIA GPUs, in two generations:
ExLlamaV2 for EXL2 models (TabbyAPI's branch exl2-checkpoint: its main dropped EXL2) and ExLlamaV3
for EXL3 (TabbyAPI's main). The model's quant_method names the generation (GENS, by format).

Bundle side, for the box in the probe file (as for vLLM, the box's torch is reused, never carried):
- exllamavN and TabbyAPI's dependencies locked with uv for the box's Python, keeping its CUDA stack;
- exllamavN's CUDA extension, which its wheel compiles at first import (nvcc, gcc, ninja: none of
  which a bare box has), built here as its own wheel for the box's Python, torch and GPU
  architectures (exl_ext_build.py, run by ext_wheel), cached by those inputs;
- TabbyAPI's source, pinned by the sha256 of an archive, unpacked file by file into the bundle so
  the manifest hashes each one;
- ExLlamaV3 attends with Triton kernels, which compile a C launcher at first use: as for vLLM, Zig's
  C compiler and the box Python's headers come along.
Box side: the wheels go into PREFIX/engines like vLLM's; tabby_run.py starts TabbyAPI with a config
and key written at start into a private folder (config.yml and api_tokens.yml are read from the
working directory).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import BundlerError

THIRD_PARTY = Path(__file__).resolve().parents[2] / "third_party"


@dataclass(frozen=True)
class Gen:
    """One ExLlama generation: its engine name (in plans and manifests, and TabbyAPI's `backend`), the
    model format it loads, its spec table, and the TabbyAPI commit that serves it (as `git archive
    --prefix=tabbyAPI-COMMIT7/` writes it; third_party/README.md says how to make it again)."""

    name: str
    label: str
    fmt: str
    spec_key: str
    version: str  # the release bundled unless the spec pins another
    tabby_commit: str
    tabby_sha256: str
    tabby_branch: str
    build_time: str  # of the extension on this 2-core machine, as measured
    triton: bool  # attends with Triton kernels, which compile a C launcher at first use (as vLLM's)

    @property
    def tabby_archive(self) -> Path:
        return THIRD_PARTY / f"tabbyAPI-{self.tabby_commit[:7]}.tar.gz"

    @property
    def ext_module(self) -> str:
        return f"{self.name}_ext"


V2 = Gen("exllamav2", "ExLlamaV2", "exl2", "exllama", "0.3.2",  # 0.3.2: the last release (EXL2 is frozen)
         "79126f904c2e00aece026b36bb70bbb87e4892b2",
         "1d3d83324ac115f815e9e0f53dc2ba1b7dfb6e3463b7b21bdb303ba29b4c0ca4", "exl2-checkpoint", "15–20 min",
         triton=False)
# 1.4.2: the release TabbyAPI's main pins (its own wheels are on GitHub only; PyPI has the sources)
V3 = Gen("exllamav3", "ExLlamaV3", "exl3", "exllamav3", "1.4.2",
         "e632af41eba68abeadc3437c62674360f2f8cbf1",
         "f0b6c886c85822d3045d709c47eec38c572dc7b5d2c561f8f0e0e572bb566041", "main", "about 21 min",
         triton=True)
GENS = {g.name: g for g in (V2, V3)}
BY_FORMAT = {g.fmt: g for g in (V2, V3)}
FORMATS = tuple(BY_FORMAT)
# What the server needs of the TabbyAPI tree; the rest (docs, notebooks, Docker, CI) stays out.
TABBY_KEEP = ("main.py", "pyproject.toml", "LICENSE", "common/", "endpoints/", "backends/", "templates/",
              "sampler_overrides/")
# Requirements TabbyAPI lists that the server never imports on Linux, or that only its own updater uses.
TABBY_DROP = ("winloop",)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_archive(path: Path, sha256: str, gen: Gen) -> dict[str, bytes]:
    """TabbyAPI's files (path inside the tree → bytes) from a .tar.gz pinned by sha256: regular files
    only, under one top folder, none outside it; only the parts the server needs (TABBY_KEEP)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundlerError(f"engines.{gen.spec_key}.tabbyapi: {path}: no such file",
                           hint="make it from a TabbyAPI checkout: git -C tabbyAPI archive --format=tar "
                                f"--prefix=tabbyAPI-{gen.tabby_commit[:7]}/ {gen.tabby_commit} | gzip -n > ARCHIVE "
                                "(third_party/README.md)")
    got = _sha256(data)
    if got != sha256:
        raise BundlerError(f"engines.{gen.spec_key}.tabbyapi: {path} has sha256 {got}, the spec pins {sha256}",
                           hint="use the archive the spec pins, or pin this one (tabbyapi_sha256) after reading it")
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        tops = set()
        for m in tf.getmembers():
            if m.type in (tarfile.XGLTYPE, tarfile.XHDTYPE) or m.isdir():
                continue
            p = PurePosixPath(m.name)
            if p.is_absolute() or ".." in p.parts or len(p.parts) < 2:
                raise BundlerError(f"{path}: {m.name!r} is not a path inside one top folder",
                                   hint="use another archive")
            tops.add(p.parts[0])
            rel = "/".join(p.parts[1:])
            if not any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in TABBY_KEEP):
                continue
            if not m.isreg():
                raise BundlerError(f"{path}: {m.name} is not a regular file (a link or device)",
                                   hint="use an archive of plain files (git archive makes one)")
            files[rel] = tf.extractfile(m).read()  # type: ignore[union-attr]
    if len(tops) != 1 or "main.py" not in files or "pyproject.toml" not in files:
        raise BundlerError(f"{path} is not a TabbyAPI source archive (one top folder holding main.py and "
                           "pyproject.toml)", hint="make it with git archive from a TabbyAPI checkout")
    return files


def requirements(files: dict[str, bytes], version: str, gen: Gen) -> list[str]:
    """What to lock: exllamavN and the dependencies TabbyAPI's pyproject.toml lists (its extras, which
    pin torch and ExLlama by GitHub address, stay out: the box's torch is kept, ExLlama comes from PyPI)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    deps = tomllib.loads(files["pyproject.toml"].decode())["project"]["dependencies"]
    keep = [d for d in deps if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() not in TABBY_DROP]
    return [f"{gen.name}=={version}", *keep]


def tabby_config(plan: Any, model_path: str, name: str, host: str, port: int) -> dict[str, Any]:
    """TabbyAPI's config for the plan (config_sample.yml names each key). JSON is YAML, so the file
    it reads is written with json; `airgap_llm` holds what tabby_run.py uses and removes."""
    model: dict[str, Any] = {
        "model_dir": "models", "model_name": name, "backend": plan.engine,
        "max_seq_len": plan.context_per_slot,
        # the KV cache holds every slot's context: TabbyAPI's cache_size is in tokens, all requests together
        # (ExLlama's cache is paged in 256 tokens: rounded up to whole pages)
        "cache_size": -(-plan.context_per_slot * max(1, plan.slots) // 256) * 256, "max_batch_size": max(1, plan.slots),
        "cache_mode": "FP16", "inline_model_loading": False, "use_dummy_models": False,
    }
    if plan.engine_defaults:  # what a user writes by hand: the model, nothing sized (--tune's reference)
        model = {k: model[k] for k in ("model_dir", "model_name", "backend")}
    elif plan.tensor_parallel > 1:
        model.update(tensor_parallel=True, tensor_parallel_backend="native", gpu_split_auto=True)
    elif plan.gpu_split_gib:
        model.update(gpu_split_auto=False, gpu_split=list(plan.gpu_split_gib))
    else:
        model.update(gpu_split_auto=True)
    return {
        # fetch requests: TabbyAPI downloads images named by URL in chat messages; never on an air-gapped box
        "network": {"host": host, "port": port, "disable_auth": False, "disable_fetch_requests": True,
                    "send_tracebacks": False, "api_servers": ["OAI"]},
        "logging": {"log_prompt": False, "log_generation_params": False, "log_requests": False},
        "model": model,
        "developer": {"unsafe_launch": False},
        "airgap_llm": {"model_path": model_path},
    }


def ext_key(exllama_sha256: str, python: str, torch: str, cuda: str, archs: str, builder_sha256: str) -> str:
    """What the extension wheel depends on: a build is reused only when all of these are the same."""
    text = "\n".join([exllama_sha256, python, torch, cuda, archs, builder_sha256])
    return _sha256(text.encode())[:24]


def box_cuda(box: Any) -> str:
    """The CUDA major of the box's torch (its nvidia-cuda-runtime wheel), "" when unknown."""
    inst = {k.lower(): v for k, v in box.installed.items()}
    v = inst.get("nvidia-cuda-runtime") or inst.get("nvidia-cuda-runtime-cu12", "")
    return v.split(".")[0] if v else ""


def arch_list(box: Any) -> str:
    """TORCH_CUDA_ARCH_LIST for the box's GPUs, e.g. "9.0" or "8.0;8.6"."""
    return ";".join(sorted({g.compute_capability for g in box.gpus})) or "8.0;8.6;8.9;9.0"


def local_python(py: str) -> str:
    """A python of version py (X.Y) on this machine that can make a venv: on PATH, else one of pyenv's."""
    import subprocess

    from ..lock import local_pythons

    return next((exe for exe in local_pythons(py)
                 if subprocess.run([exe, "-c", "import venv"], capture_output=True).returncode == 0), "")


def cuda_home() -> str:
    """The CUDA toolkit to compile with: a folder with bin/nvcc and the toolkit's headers. torch takes
    nvcc's folder's parent, which is wrong where nvcc on PATH is a link or a wrapper script (here
    /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc): then the headers are not found."""
    import os
    import shutil

    cands = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
        text = Path(nvcc).read_bytes()[:4096] if Path(nvcc).stat().st_size < 4096 else b""
        m = re.search(rb"(/\S+)/bin/nvcc", text)  # a wrapper script naming the real one
        if m:
            cands.append(m.group(1).decode())
    cands += ["/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)]
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "crt" / "host_config.h").is_file():
            return c
    return ""


def find_nvcc() -> str:
    home = cuda_home()
    return str(Path(home) / "bin" / "nvcc") if home else ""


BUILDER = Path(__file__).with_name("exl_ext_build.py")


def _build_for(box: Any) -> tuple[str, str, str, str]:
    """What the extension is built for: the box's Python (X.Y), torch version, CUDA major, GPU architectures."""
    torch = {k.lower(): v for k, v in box.installed.items()}.get("torch", "")
    return ".".join(box.python.split(".")[:2]), torch, box_cuda(box), arch_list(box)


def ext_inputs(exl_sha256: str, box: Any, gen: Gen) -> tuple[str, Path, list[str]]:
    """(cache key, cache folder, why it cannot be built here: [] when it can) of exllamavN's extension
    for the box; checked before anything is downloaded."""
    from ..cache import cache_root

    py, torch, cuda, archs = _build_for(box)
    key = ext_key(exl_sha256, py, torch, cuda, archs, _sha256(BUILDER.read_bytes()))
    why = []
    if not torch:
        why.append("the box's python has no torch (the probe file lists none)")
    if not find_nvcc():
        why.append("this machine has no CUDA toolkit (nvcc and its headers; CUDA_HOME names one elsewhere)")
    if not local_python(py):
        why.append(f"this machine has no python{py} (with venv) to build for the box's Python")
    return key, cache_root() / f"{gen.name}-ext" / key, why


def cached_ext(folder: Path, gen: Gen) -> Path | None:
    found = sorted(folder.glob(f"{gen.ext_module}-*.whl")) if (folder / "complete").is_file() else []
    return found[0] if found else None


def refuse_unbuildable(box: Any, why: list[str], gen: Gen) -> None:
    py, _, cuda, _ = _build_for(box)
    raise BundlerError(f"cannot build {gen.label}'s CUDA extension for the box here: " + "; ".join(why)
                       + "; nothing was downloaded",
                       hint=f"bundle on a machine with nvcc {cuda or '(the CUDA of the box torch)'}.x and Python {py} "
                            f"(e.g. pyenv install {py}); the build ({gen.build_time} on 2 cores) is cached for later "
                            "bundles")


def ext_wheel(exl_wheel: Path, box: Any, gen: Gen, log=print) -> Path:
    """exllamavN's extension as a wheel for the box: from the cache (keyed by every input), else built
    here in a venv of the box's Python with PyPI's torch of the box's version (gen.build_time on 2 cores)."""
    import os
    import shutil
    import subprocess
    import time

    from ..cache import cache_root
    from ..lock import _run

    key, done, why = ext_inputs(_sha256(exl_wheel.read_bytes()), box, gen)
    py, torch, cuda, archs = _build_for(box)
    found = cached_ext(done, gen)
    if found:
        log(f"{gen.label}'s extension: cached build {found.name} (Python {py}, torch {torch}, CUDA {cuda}, "
            f"GPU architectures {archs})")
        return found
    if why:
        refuse_unbuildable(box, why, gen)
    nvcc, exe = find_nvcc(), local_python(py)
    home = cache_root() / "exllama-build"  # the venvs, one per Python and torch, shared by both generations
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.", out)
    if cuda and m and m.group(1) != cuda:
        raise BundlerError(f"nvcc here is CUDA {m.group(1)}, the box's torch is built for CUDA {cuda}",
                           hint=f"put a CUDA {cuda} nvcc first on PATH")
    venv = home / f"venv-{py}-torch{torch}"
    if not (venv / "ready").is_file():
        log(f"making a Python {py} venv with torch=={torch} to build against ({venv}; once)")
        _run([exe, "-m", "venv", "--clear", str(venv)], "venv for the extension build", f"check {exe}")
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"torch=={torch}", "ninja",
              "setuptools", "wheel"], f"installing torch=={torch} for the extension build",
             "the box's torch version must be on the index")
        (venv / "ready").write_text(torch + "\n")
    got = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.version.cuda)"],
                         capture_output=True, text=True).stdout.strip()
    if cuda and got.split(".")[0] != cuda:
        raise BundlerError(f"torch=={torch} from the index is built for CUDA {got}, the box's for CUDA {cuda}",
                           hint="the extension must link the box's exact torch build")
    work = home / f".{key}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    jobs = str(os.cpu_count() or 1)
    log(f"building {gen.label}'s CUDA extension for Python {py}, torch {torch}, CUDA {got}, GPU architectures "
        f"{archs} ({jobs} jobs; {gen.build_time} on 2 cores, once: cached as {done})")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=archs, MAX_JOBS=jobs, CUDA_HOME=str(Path(nvcc).parents[1]),
               PATH=f"{Path(nvcc).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.monotonic()
    with open(work / "build.log", "w") as lf:
        proc = subprocess.Popen([str(venv / "bin" / "python"), str(BUILDER), str(exl_wheel), str(work)],
                                stdout=lf, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(5)
            if int(time.monotonic() - t0) % 120 < 5:
                log(f"  ... building ({time.monotonic() - t0:.0f}s)")
    if proc.returncode != 0:
        tail = (work / "build.log").read_text()[-1500:]
        raise BundlerError(f"the {gen.label} extension build failed (exit {proc.returncode}):\n{tail}",
                           hint=f"full log: {work / 'build.log'}")
    (work / "complete").write_text(f"{py} torch {torch} cuda {got} archs {archs} {time.monotonic() - t0:.0f}s\n")
    shutil.rmtree(done, ignore_errors=True)
    os.replace(work, done)
    built = cached_ext(done, gen)
    if built is None:
        raise BundlerError(f"the {gen.label} extension build wrote no wheel into {done}",
                           hint="see its build.log there")
    log(f"{gen.label}'s extension: built {built.name} in {time.monotonic() - t0:.0f}s")
    return built
