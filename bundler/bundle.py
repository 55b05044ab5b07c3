"""`make bundle`: spec → one self-checking bundle directory and tar.

    lock + fetch wheels → build llama-server → fetch weights → render install.sh
    → manifest + SHA256SUMS → move into place → tar

Everything is staged in dist/.NAME.partial and moved into place only when
whole, so a failed or interrupted run never leaves a half bundle under dist/NAME.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__, lock, manifest, sbom, sources, vulns
from .contract import embedded
from .engines import for_format
from .errors import BundlerError
from .modelinfo import inspect_gguf
from .render import render
from .spec import SPLIT_RE, Spec, engine_builds, split_names
from .staging import staged_dir

# Wheels the installer imports straight from the bundle before anything is installed.
BOOTSTRAP = ("airgap_llm-*.whl", "jinja2-*.whl", "markupsafe-*.whl", "tqdm-*.whl", "nvidia_ml_py-*.whl",
             "installer-*.whl")
# x86-64 instructions a GGML_NATIVE=OFF build uses (INS_ENB defaults in ggml/CMakeLists.txt).
GLIBC_LIBS = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux", "linux-vdso")
# CUDA's own libraries are not copied from this machine: _cuda_runtime() carries them from
# NVIDIA's hash-locked wheels, or points at the box's copies.
CUDA_LIBS = ("libcuda.", "libcudart", "libcublas", "libnv")


@dataclass(frozen=True)
class Result:
    directory: Path
    tar: Path
    size: int
    seconds: float


def _step(log, title: str) -> None:
    log(f"==> {title}")


@dataclass
class BuildContext:
    """What an engine's bundle side gets from the bundle being made: the spec, the folder being
    filled, the box's probe (or None) and the helpers every engine uses."""

    spec: Spec
    stage: Path
    target: Any
    reuse_installed: bool
    log: Callable[[str], None]

    def step(self, title: str) -> None:
        _step(self.log, title)

    def link(self, src: Path, dst: Path) -> None:
        _link_or_copy(src, dst)

    def needs_box(self, label: str) -> None:
        _needs_box(self.target, self.reuse_installed, label)

    def python_headers(self, edir: Path) -> str:
        return _python_headers(self.spec, self.target, edir, self.log)

    def glibc_needed(self, binary: Path) -> str:
        return _glibc_needed(binary)

    def shared_libs(self, binary: Path) -> list[Path]:
        return _shared_libs(binary)


def _glibc_needed(binary: Path) -> str:
    try:
        out = subprocess.run(["objdump", "-T", str(binary)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BundlerError(f"cannot read the symbols of {binary}: {e}", hint="install binutils (objdump)")
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_([0-9]+(?:\.[0-9]+)+)", out)}
    return ".".join(map(str, max(versions))) if versions else "0"


def _shared_libs(binary: Path) -> list[Path]:
    """Non-glibc shared libraries the binary loads (carried beside it)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m and not any(m.group(1).startswith(g) for g in GLIBC_LIBS + CUDA_LIBS) and m.group(2) != "not":
            libs.append(Path(m.group(2)))
    return libs


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):  # one file served as two models (say chat and embed)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make(spec: Spec, out_dir: Path, log=print, target: Any = None, reuse_installed: bool = False,
         part_size: int = 0, sign: bool = True, upgrade_models: bool = False, base: Path | None = None) -> Result:
    """Build the bundle. `target` (a probe.Hardware) bundles for that box: its Python,
    glibc and GPU architectures; with reuse_installed, what its python already has is
    not carried. part_size splits every larger file into parts of at most that size.
    base (an earlier bundle's folder or manifest.json): a delta bundle that carries only the files
    the base lacks (by sha256); the box takes the others from the base (install.sh --base)."""
    t0 = time.monotonic()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / spec.name
    base_doc = _read_base(base, final) if base is not None else None
    with staged_dir(final, out_dir / f".{spec.name}.partial") as stage:
        (stage / "wheels").mkdir()
        meta = _fill(spec, stage, log, target, reuse_installed, upgrade_models)
        _check_contract(meta)
        _step(log, "software bill of materials (sbom.cdx.json) and license inventory (LICENSES.txt)")
        for line in sbom.write(stage, meta):  # before the manifest: the signature covers both
            log(line)
        _step(log, "vulnerability report (vulnerabilities.json)")
        vulns.write(stage, spec.policy.vulnerabilities, log,
                    sources=[e["source"] for e in meta["engines"] if "==" in str(e.get("source", ""))])
        if sign:
            from . import signing

            _, pub = signing.load_or_create(log)
            (stage / signing.SIGNER_PUB).write_text(pub.to_text())
            meta["signed_by"] = pub.fingerprint
        _step(log, "writing manifest and SHA256SUMS")
        entries = manifest.scan(stage)
        from_base: set[str] = set()
        if base_doc is not None:
            from_base = _leave_to_base(stage, entries, base_doc, meta, log)
        if part_size:
            carried = manifest.split_large(stage, [e for e in entries if e.path not in from_base], part_size, log=log)
            entries = carried + [e for e in entries if e.path in from_base]
        manifest.write(stage, meta, entries)
        if sign:
            signing.sign(stage, log)
    tar_path = out_dir / f"{spec.name}.tar"
    size = sum(e.size for e in entries if e.path not in from_base)
    if part_size:  # the directory of small files is what travels; a tar would be one big file again
        tar_path.unlink(missing_ok=True)
        return Result(final, tar_path, size, time.monotonic() - t0)
    _step(log, f"writing {tar_path.name}")
    tmp_tar = tar_path.with_suffix(".tar.partial")
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(final, arcname=spec.name, recursive=True)
        os.replace(tmp_tar, tar_path)
    finally:
        tmp_tar.unlink(missing_ok=True)
    # a stdlib-only checker/extractor to carry beside the tar (python3 NAME.unpack.py NAME.tar)
    (out_dir / f"{spec.name}.unpack.py").write_text(unpacker(spec.name))
    return Result(final, tar_path, size, time.monotonic() - t0)


# What a delta bundle always carries: what bootstrap.py and install.sh read before the installer can
# take anything from the base (the installer's own wheels, the scripts), and the bundle's own papers
DELTA_KEEP = ("install.sh", "bootstrap.py", "README.txt", "requirements.lock", "sbom.cdx.json", "LICENSES.txt",
              "vulnerabilities.json", "signer.pub")


def _read_base(base: Path, final: Path) -> dict[str, Any]:
    """The base bundle's manifest (a bundle folder or its manifest.json), with its sha256."""
    base = Path(base)
    path = base / manifest.MANIFEST if base.is_dir() else base
    try:
        data = path.read_bytes()
        doc = json.loads(data)
        files = doc["files"]
        name, version = doc["name"], str(doc["version"])
    except FileNotFoundError:
        raise BundlerError(f"--base {base}: no manifest.json there", hint="name the earlier bundle's folder (or its "
                           "manifest.json), as make bundle wrote it")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundlerError(f"--base {base}: not a bundle manifest ({e})", hint="name the earlier bundle's folder")
    if path.resolve().parent == final.resolve():
        raise BundlerError(f"--base {base} is the folder this bundle is written to, which would replace it",
                           hint="write the delta elsewhere (--out OTHER, make bundle OUT=OTHER), and keep the base")
    return {"name": name, "version": version, "manifest_sha256": hashlib.sha256(data).hexdigest(),
            "shas": {f["sha256"] for f in files if isinstance(f, dict) and "sha256" in f}}


def _leave_to_base(stage: Path, entries: list[Any], base: dict[str, Any], meta: dict[str, Any], log) -> set[str]:
    """Remove from the stage every file the base already holds (same sha256), except what must travel;
    the manifest keeps listing them (the box fills them in from the base and verifies the whole)."""
    keep_wheels = tuple(f"wheels/{pattern}" for pattern in BOOTSTRAP)
    from_base = set()
    for e in entries:
        if e.sha256 not in base["shas"] or e.path in DELTA_KEEP or any(fnmatch.fnmatch(e.path, k) for k in keep_wheels):
            continue
        (stage / e.path).unlink()
        from_base.add(e.path)
    for dirpath, _, filenames in os.walk(stage, topdown=False):  # folders left empty go too
        if not filenames and not os.listdir(dirpath) and Path(dirpath) != stage:
            os.rmdir(dirpath)
    total = sum(e.size for e in entries)
    left = sum(e.size for e in entries if e.path in from_base)
    meta["delta"] = {"base": {k: base[k] for k in ("name", "version", "manifest_sha256")},
                     "from_base": sorted(from_base)}
    log(f"delta over {base['name']} {base['version']}: carries {len(entries) - len(from_base)} of {len(entries)} "
        f"files ({(total - left) / 2**20:.1f} of {total / 2**20:.1f} MiB); the box takes the rest from that bundle "
        "(install.sh --base ITS_FOLDER)")
    return from_base


def _check_contract(meta: dict[str, Any]) -> None:
    """What is about to be signed reads as the box reads it (contract/bundle.py): a bundler that writes a
    manifest its own installer cannot read fails here, not on the box."""
    from .contract.bundle import BundleDoc, ContractError

    try:
        BundleDoc.from_json(meta)
    except ContractError as e:
        raise BundlerError(f"internal error: the manifest this bundler wrote breaks its own schema ({e})",
                           hint="report it with the spec; nothing was written")


def bootstrap_script(ctx: dict[str, Any]) -> str:
    """bootstrap.py: the first Python install.sh runs, with the Ed25519 verifier and the trust policy
    embedded verbatim (contract/)."""
    contract = Path(__file__).parent / "contract"
    return render("bootstrap.py.j2", dict(ctx, ed25519=embedded(contract / "ed25519.py", first=True),
                                          policy=embedded(contract / "trust.py"), bootstrap=repr(list(BOOTSTRAP))))


def unpacker(name: str) -> str:
    """NAME.unpack.py: the stdlib-only checker/extractor carried beside the tar."""
    here = Path(__file__).parent
    return render("unpack.py.j2", {
        "name": name, "ed25519": embedded(here / "contract" / "ed25519.py", first=True),
        "policy": embedded(here / "contract" / "trust.py"), "safetar": embedded(here / "safetar.py")})


def _repo_model(spec: Spec, m: Any, stage: Path, upgrade: bool, log) -> dict[str, Any]:
    """A whole hub repository: resolved once into the lock beside the spec (reused until its source
    changes or --upgrade-models), every file fetched and checked against the lock, staged under
    models/NAME/ as the repository lays it out."""
    from .modelinfo import inspect_hf
    from .sources import repo

    spec_path = Path(spec.path)
    lockdoc = repo.read_lock(spec_path)
    r = None if upgrade else repo.locked(lockdoc, m.name, m.source, m.include, m.exclude)
    if r is None:
        log(f"resolving {m.source} (include {list(m.include) or 'all'}, exclude {list(m.exclude) or 'none'})")
        r = repo.resolve(m.source, m.include, m.exclude)
        log(f"{m.source}: commit {r.commit}, {len(r.files)} files, {sum(f.size for f in r.files) / 2**20:.1f} MiB")
    else:
        log(f"{m.source}: locked at commit {r.commit} ({repo.lock_path(spec_path).name}; --upgrade-models "
            "resolves it again)")
    r, blobs = repo.fetch_files(r, log=log)
    repo.record(lockdoc, m.name, r, m.include, m.exclude)
    repo.write_lock(spec_path, lockdoc)
    folder = stage / "models" / m.file
    for f in r.files:
        _link_or_copy(blobs[f.path], folder / f.path)
    files = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in r.files]
    entry: dict[str, Any] = {"name": m.name, "format": m.format, "source": m.source, "commit": r.commit,
                             "files": files}
    if m.format == "gguf":
        ggufs = sorted(f.path for f in r.files if f.path.endswith(".gguf"))
        later = [g for g in ggufs if (sm := SPLIT_RE.match(Path(g).name)) and int(sm["no"]) != 1]
        first = [g for g in ggufs if g not in later]
        if len(first) != 1:
            raise BundlerError(f"{m.source}: include {list(m.include)} takes {len(first)} GGUF models ({first})",
                               hint="narrow models.include to one quantization")
        sha = {f.path: f.sha256 for f in r.files}
        others = [str(Path(first[0]).with_name(o)) for o in split_names(Path(first[0]).name)]
        missing = [o for o in others if o not in sha]
        if missing:
            raise BundlerError(f"{m.source}: {first[0]} is split, and include {list(m.include)} leaves out "
                               f"{', '.join(missing)}", hint="widen models.include to take every part")
        entry.update(file=f"models/{m.file}/{first[0]}", sha256=sha[first[0]],
                     parts=[{"file": f"models/{m.file}/{o}", "sha256": sha[o]} for o in others],
                     facts=inspect_gguf(folder / first[0]).to_dict())
    else:
        info = inspect_hf(folder)
        if info.format != m.format:  # the engines were chosen by the spec's format, before the model came
            raise BundlerError(f"{m.source}: model {m.name} is {info.format.upper()} (its config.json says so), the "
                               f"spec says format = {m.format!r}", hint=f"set format = \"{info.format}\" in the spec")
        entry.update(file=f"models/{m.file}", sha256=_tree_id(files), facts=info.to_dict(), dir=True)
        log(f"model {m.name}: {info.architecture}, {info.layers} layers, {info.file_size / 2**30:.2f} GiB of weights"
            + (f", {info.quantization}" if info.quantization else ""))
    return entry


def _tree_id(files: list[dict[str, Any]]) -> str:
    """One sha256 for a directory model: over its files' paths and sha256, sorted."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["path"]):
        h.update(f"{f['path']}\0{f['sha256']}\n".encode())
    return h.hexdigest()


def check(spec: Spec, target: Any = None, reuse_installed: bool = False) -> list[str]:
    """What can be known before any download or build (the spec itself was checked whole when it
    loaded): each engine's needs of the box, the box's Python. Raises BundlerError; returns what the
    bundle will hold, a line each. `bundler check` and the first step of `bundler bundle`."""
    wanted = [b for b in engine_builds() if b.wanted(spec)]
    for b in wanted:  # e.g. vLLM and ExLlama are locked against the box's own torch: its probe file
        if b.NEEDS_BOX:
            _needs_box(target, reuse_installed, b.describe(spec))
    if spec.policy.vulnerabilities == "refuse":  # no bundle without a report: find out before the build
        why = vulns.reachable()
        if why:
            raise BundlerError(f"the spec's [policy] vulnerabilities = \"refuse\" needs the vulnerability database, "
                               f"and {why}", hint="set AIRGAP_LLM_OSV_URL to a mirror this machine reaches, or "
                                                  "vulnerabilities = \"warn\" to bundle with the report saying "
                                                  "\"not checked\"")
    if target is not None:
        py = ".".join(target.python.split(".")[:2])
        if py not in ("3.9", "3.10", "3.11", "3.12", "3.13"):
            raise BundlerError(f"the box's python is {target.python}; the installer runs on 3.9 to 3.13",
                               hint="point the probe at a supported python3 there (AIRGAP_LLM_PYTHON) and probe again")
    lines = [f"{spec.name} {spec.version}: {len(spec.models)} model(s)"]
    for m in spec.models:
        lines.append(f"  {m.name}: {m.format} ({m.task}) from {m.source}")
    engines = [b.describe(spec) for b in wanted]
    lines.append(f"  engines: {', '.join(engines) or 'none (models only)'}")
    if target is not None:
        lines.append(f"  for the box: Python {target.python}, glibc {target.glibc}, {len(target.gpus)} GPU(s)")
    return lines


def _fill(spec: Spec, stage: Path, log, target: Any = None, reuse_installed: bool = False,
          upgrade_models: bool = False) -> dict[str, Any]:
    check(spec, target, reuse_installed)  # before any download or build
    wheels_dir = stage / "wheels"
    cache = lock.wheel_cache()
    pythons = spec.target.pythons
    if target is not None:
        pythons = (".".join(target.python.split(".")[:2]),)
        log(f"bundling for the box in the target file: {target.os}, Python {target.python}, glibc {target.glibc}, "
            f"{len(target.gpus)} GPU(s)")

    _step(log, "locking the installer's dependencies (pip-compile --generate-hashes)")
    with tempfile.TemporaryDirectory(prefix="airgap-lock-") as td:
        box_lock = Path(td) / "box.lock"
        pins = lock.compile_lock(lock.runtime_requirements(), box_lock)
        for py in pythons:
            log(f"fetching wheels for Python {py}")
            for whl in lock.download(box_lock, cache, python=py):
                if not (wheels_dir / whl.name).exists():
                    _link_or_copy(whl, wheels_dir / whl.name)
    log("building the airgap-llm wheel")
    lock.build_own_wheel(wheels_dir)
    names = lock.write_install_lock(wheels_dir, stage / "requirements.lock")
    missing = {n for n, _ in pins} - set(names)
    if missing:
        raise BundlerError(f"wheels missing from the bundle: {', '.join(sorted(missing))}", hint="re-run make bundle")

    ctx = BuildContext(spec, stage, target, reuse_installed, log)
    engines = [entry for b in engine_builds() if b.wanted(spec) for entry in b.bundle(ctx)]

    models = []
    for m in spec.models:
        if m.on_box:
            models.append({"name": m.name, "file": m.file, "on_box": True, "sha256": m.sha256, "format": m.format,
                           "source": m.source, "facts": None})
            log(f"model {m.name}: served from {m.file} on the box (carried separately"
                + (f", pinned by sha256 {m.sha256})" if m.sha256 else "; no sha256 pinned)"))
            continue
        _step(log, f"model {m.name} ({m.source})")
        if m.is_repo:
            models.append(_repo_model(spec, m, stage, upgrade_models, log))
            continue
        _link_or_copy(sources.fetch(m, log=log), stage / "models" / m.file)
        for file, sha in m.parts:  # a split GGUF: every part beside the first, as llama-server loads them
            _link_or_copy(sources.fetch(m.part(file, sha), log=log), stage / "models" / file)
        facts = for_format(m.format).facts or inspect_gguf  # a file: GGUF's header, or its engine's reader
        info = facts(stage / "models" / m.file)
        models.append({"name": m.name, "file": f"models/{m.file}", "sha256": m.sha256, "format": m.format,
                       "source": m.source, "facts": info.to_dict(),
                       "parts": [{"file": f"models/{f}", "sha256": sha} for f, sha in m.parts]})
        log(f"model {m.name}: {info.architecture}, {info.layers} layers, {info.file_size / 2**20:.0f} MiB, "
            f"trained context {info.context_length}")
    for m, entry in zip(spec.models, models):  # what each serves, and where
        entry.update(task=m.task, port=m.port)

    meta = {
        "schema": 1,
        "name": spec.name,
        "version": spec.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "airgap_llm": __version__,
        "built_on": {"arch": platform.machine(), "python": platform.python_version(),
                     "glibc": platform.libc_ver()[1]},
        "pythons": list(pythons),
        "target": _assumptions(target, reuse_installed, engines),
        "service": spec.to_dict()["service"],
        "models": models,
        "engines": engines,
        "bootstrap": list(BOOTSTRAP),
    }
    _step(log, "rendering install.sh")
    ctx = {"name": spec.name, "version": spec.version, "model": spec.models[0].name, "port": spec.service.port,
           "host": spec.service.host, "pythons": pythons, "bootstrap": BOOTSTRAP}
    (stage / "install.sh").write_text(render("install.sh.j2", ctx))
    (stage / "install.sh").chmod(0o755)
    (stage / "bootstrap.py").write_text(bootstrap_script(ctx))
    (stage / "README.txt").write_text(render("README.txt.j2", dict(ctx, engines=engines, models=models)))
    return meta


def _needs_box(target: Any, reuse_installed: bool, engine: str) -> None:
    if target is None:
        raise BundlerError(f"bundling {engine} needs the box's probe file (its Python and CUDA stack)",
                           hint="run ./install.sh --probe > box.json on the box, then make bundle TARGET=box.json")
    if not reuse_installed:
        raise BundlerError(f"bundling {engine} without --reuse-installed would carry torch and CUDA (~4.3 GB)",
                           hint="add REUSE=1 (make) or --reuse-installed (bundler) on a box that has torch")


def _local_headers(py: str) -> Path | None:
    """The include root of a Python py (X.Y) on this machine that has its headers: this one, else a
    pythonX.Y on PATH or in pyenv's versions."""
    import sysconfig

    if ".".join(platform.python_version().split(".")[:2]) == py:
        return Path(sysconfig.get_paths()["include"]).parent
    for exe in lock.local_pythons(py):
        r = subprocess.run([exe, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                           capture_output=True, text=True)
        if r.returncode == 0 and (Path(r.stdout.strip()) / "Python.h").is_file():
            return Path(r.stdout.strip()).parent
    return None


def _python_headers(spec: Spec, target: Any, edir: Path, log) -> str:
    """The target Python's headers (pythonX.Y/ and ARCH-linux-gnu/pythonX.Y/ of an include root) into
    engines/ENGINE/include, checked by compiling `#include <Python.h>`: from engines.vllm.python_headers,
    else those of a pythonX.Y of the same version on this machine (the running one, or one on PATH).
    Returns the folder in the bundle, or "" (then a box without them must have its pythonX.Y-dev
    package: the installer says so)."""
    from .toolchains import zig_toolchain

    py = ".".join(target.python.split(".")[:2])
    root = Path(spec.vllm.python_headers) if spec.vllm.python_headers else _local_headers(py)
    if root is None or not (root / f"python{py}" / "Python.h").is_file():
        log(f"warning: no headers of Python {py} here (no python{py} with them on this machine): a box whose "
            f"Python has no python{py}-dev needs one for Triton; set engines.vllm.python_headers to bring them")
        return ""
    dest = edir / "include"
    for sub in (f"python{py}", f"{target.arch}-linux-gnu/python{py}"):
        if (root / sub).is_dir():
            shutil.copytree(root / sub, dest / sub, symlinks=False)
    zig, _ = zig_toolchain(log)
    with tempfile.TemporaryDirectory(prefix="airgap-pyh-") as td:
        src = Path(td) / "t.c"
        major, minor = (int(x) for x in py.split("."))
        src.write_text(f"#include <Python.h>\n#if PY_MAJOR_VERSION * 100 + PY_MINOR_VERSION != {major * 100 + minor}"
                       "\n#error the headers are of another Python version\n#endif\n")
        r = subprocess.run([str(zig / "cc"), "-c", str(src), "-o", str(Path(td) / "t.o"), f"-I{dest / f'python{py}'}",
                            f"-I{dest}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BundlerError(f"the Python {py} headers from {root} do not compile: {r.stderr.strip()[-400:]}",
                           hint=f"name an include root that holds python{py}/ (and {target.arch}-linux-gnu/python{py}/ "
                                "where pyconfig.h includes it), as the python-dev package lays them out")
    log(f"Python {py} headers from {root} (for Triton's launchers on a box without python{py}-dev)")
    return f"engines/{edir.name}/include"


def _assumptions(target: Any, reuse_installed: bool, engines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the bundle assumed of the box; the installer refuses a box that breaks one."""
    if target is None:
        return None
    need: dict[str, str] = {}
    if reuse_installed:
        for e in engines:
            need.update(e.get("reuses") or {})
            if e.get("box_lib_dirs"):
                need.update({k: v for k, v in target.installed.items()
                             if k in ("nvidia-cublas", "nvidia-cuda-runtime")})
    return {"python": ".".join(target.python.split(".")[:2]), "arch": target.arch, "glibc_min": target.glibc,
            "driver_min": "580" if any(e.get("cuda") for e in engines) else "", "installed": need,
            "python_path": target.python_path}
