"""ExLlama, bundle side, for the box in the probe file (as for vLLM, the box's torch is reused):
- exllamavN and TabbyAPI's dependencies locked with uv for the box's Python (bundler/boxlock.py);
- exllamavN's CUDA extension, which its wheel compiles at first import (nvcc, gcc, ninja: none of
  which a bare box has), built here as its own wheel for the box's Python, torch and GPU
  architectures (ext_build.py, run by ext_wheel), cached by those inputs;
- TabbyAPI's source, pinned by the sha256 of an archive, unpacked file by file into the bundle so
  the manifest hashes each one;
- ExLlamaV3 attends with Triton kernels, which compile a C launcher at first use: as for vLLM, Zig's
  C compiler and the box Python's headers come along.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ...errors import BundlerError
from . import GENS, Gen


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

    from ...lock import local_pythons

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


BUILDER = Path(__file__).with_name("ext_build.py")


def _build_for(box: Any) -> tuple[str, str, str, str]:
    """What the extension is built for: the box's Python (X.Y), torch version, CUDA major, GPU architectures."""
    torch = {k.lower(): v for k, v in box.installed.items()}.get("torch", "")
    return ".".join(box.python.split(".")[:2]), torch, box_cuda(box), arch_list(box)


def ext_inputs(exl_sha256: str, box: Any, gen: Gen) -> tuple[str, Path, list[str]]:
    """(cache key, cache folder, why it cannot be built here: [] when it can) of exllamavN's extension
    for the box; checked before anything is downloaded."""
    from ...cache import cache_root

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


def commit_build(work: Path, done: Path) -> None:
    """A finished build folder into the cache under its key. The cache's folder for the generation may
    not exist yet (a fresh cache): a 10-minute build once failed at this last step for want of it."""
    import os
    import shutil

    done.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(done, ignore_errors=True)
    os.replace(work, done)


def ext_wheel(exl_wheel: Path, box: Any, gen: Gen, log=print) -> Path:
    """exllamavN's extension as a wheel for the box: from the cache (keyed by every input), else built
    here in a venv of the box's Python with PyPI's torch of the box's version (gen.build_time on 2 cores)."""
    import os
    import shutil
    import subprocess
    import time

    from ...cache import cache_root
    from ...lock import _run

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
    commit_build(work, done)
    built = cached_ext(done, gen)
    if built is None:
        raise BundlerError(f"the {gen.label} extension build wrote no wheel into {done}",
                           hint="see its build.log there")
    log(f"{gen.label}'s extension: built {built.name} in {time.monotonic() - t0:.0f}s")
    return built


# [engines.exllama] (ExLlamaV2) and [engines.exllamav3]: each bundled when a model has its format
SPEC_TABLES = tuple(g.spec_key for g in GENS.values())
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ExllamaSpec:
    """ExLlama behind TabbyAPI: the release, and TabbyAPI's source as a .tar.gz (a path, or https://)
    pinned by sha256 ("" = the one in third_party/)."""

    version: str
    tabbyapi: str = ""
    tabbyapi_sha256: str = ""


def read_spec(table: str, r: Any, path: Path) -> ExllamaSpec:
    default = next(g.version for g in GENS.values() if g.spec_key == table)
    version = r.get("version", str, default)
    if not re.match(r"^\d+\.\d+(\.\d+)?$", version):
        r.fail(f"engines.{table}.version", f"is {version!r}", f"pin a release, e.g. version = \"{default}\"")
    tabby = r.get("tabbyapi", str, "")
    tsha = r.get("tabbyapi_sha256", str, ... if tabby else "",
                 hint="pin the archive: tabbyapi_sha256 = the output of sha256sum ARCHIVE").lower()
    if tabby and not SHA_RE.match(tsha):
        r.fail(f"engines.{table}.tabbyapi_sha256", f"{tsha!r} is not a sha256 (64 hex digits)", "sha256sum ARCHIVE")
    if tabby and not tabby.startswith("https://"):
        tabby = str((path.parent / tabby).resolve()) if not Path(tabby).is_absolute() else tabby
    return ExllamaSpec(version=version, tabbyapi=tabby, tabbyapi_sha256=tsha)


NEEDS_BOX = True  # locked against the box's own torch, its extension built for the box's Python and CUDA


def _gens(spec: Any) -> list[Gen]:
    """The generations the spec's models need (EXL2 → V2, EXL3 → V3)."""
    return [g for g in GENS.values() if any(m.format == g.fmt for m in spec.models)]


def wanted(spec: Any) -> bool:
    return bool(_gens(spec))


def offers(spec: Any) -> list[str]:
    return [g.name for g in _gens(spec)]


def describe(spec: Any) -> str:
    return ", ".join(g.label for g in _gens(spec))


def bundle(ctx: Any) -> list[dict[str, Any]]:
    return [bundle_gen(ctx, gen) for gen in _gens(ctx.spec)]


def bundle_gen(ctx: Any, gen: Gen) -> dict[str, Any]:
    """ExLlama (gen: V2 or V3) + TabbyAPI for the box: the locked wheels, the extension built for the
    box, TabbyAPI's source files (engines/exllamavN/tabbyapi/, each hashed by the manifest); for
    ExLlamaV3, whose attention is Triton's, a C compiler and the Python headers as for vLLM."""
    from ... import lock, sources
    from ...boxlock import download, lock_requirements
    from ...spec import ModelSpec

    target, log = ctx.target, ctx.log
    ctx.needs_box(gen.label)
    x = getattr(ctx.spec, gen.spec_key)
    ctx.step(f"{gen.label} {x.version} and TabbyAPI ({gen.tabby_branch}) for the box")
    archive, sha = Path(x.tabbyapi), x.tabbyapi_sha256
    if not x.tabbyapi:  # the archive this checkout carries (third_party/)
        archive, sha = gen.tabby_archive, gen.tabby_sha256
    if x.tabbyapi.startswith("https://"):  # a file pinned by sha256 like a model's: resumed, checked, cached
        archive = sources.fetch(ModelSpec(name="tabbyapi", source=x.tabbyapi, sha256=sha, format="tar.gz",
                                          file=f"tabbyAPI-{sha[:12]}.tar.gz"), log=log)
    files = read_archive(archive, sha, gen)
    edir = ctx.stage / "engines" / gen.name
    for rel, data in sorted(files.items()):
        (edir / "tabbyapi" / rel).parent.mkdir(parents=True, exist_ok=True)
        (edir / "tabbyapi" / rel).write_bytes(data)
    with tempfile.TemporaryDirectory(prefix="airgap-exl-") as td:
        carry, summary = lock_requirements(requirements(files, x.version, gen), target, Path(td),
                                           f"{gen.name}=={x.version} + TabbyAPI", log=log)
    if gen.name not in carry:
        raise BundlerError(f"the lock carries no {gen.name} for the box ({summary})", hint="bundle again")
    hashes = carry[gen.name][1]  # its one py3-none-any wheel: the extension is built from its sources
    _, folder, why = ext_inputs(hashes[0].rsplit(":", 1)[1] if len(hashes) == 1 else "", target, gen)
    if why and cached_ext(folder, gen) is None:
        refuse_unbuildable(target, why, gen)
    wheels = download(carry, target, lock.wheel_cache() / "exllama", log=log)
    exl = next(w for w in wheels if w.name.startswith(f"{gen.name}-"))
    ext = ext_wheel(exl, target, gen, log=log)
    (edir / "wheels").mkdir(parents=True)
    for w in [*wheels, ext]:
        ctx.link(w, edir / "wheels" / w.name)
    headers = ""
    if gen.triton:  # Triton's launchers (see vLLM's)
        from ...toolchains import zig_wheel

        zw = zig_wheel(target.arch, log)
        ctx.link(zw, edir / "wheels" / zw.name)
        headers = ctx.python_headers(edir)
    lock.write_install_lock(edir / "wheels", edir / "requirements.lock")
    reused = summary.pop("reuses")
    return {"name": gen.name, "backend": "cuda", "version": x.version, "dir": f"engines/{gen.name}",
            "tabbyapi": f"engines/{gen.name}/tabbyapi", "tabbyapi_sha256": sha, "extension": ext.name,
            "python": summary["python"], "arch": target.arch, "glibc": "2.28",
            "cuda": box_cuda(target) or "13",
            "lock": summary, "reuses": reused, "cpu_flags": [], "python_headers": headers}
