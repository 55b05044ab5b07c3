"""Hash-locked wheels: pip-compile for the lock, pip download for the files.

Locks are made with pip-compile (--generate-hashes --allow-unsafe), which can
only lock for the interpreter running it, so the box's runtime dependencies are
kept pure Python (plus markupsafe, whose wheels are fetched for every Python the
bundle supports; its lock lists the hashes of all of them). The install lock in
the bundle is written from the wheel files actually there, so our own wheel,
built here, is hash-pinned too.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .cache import cache_root
from .errors import BundlerError

from .contract.locks import WHEEL_RE, normalize, parse  # noqa: F401 - lock.WHEEL_RE and lock.normalize, as before


def wheel_cache() -> Path:
    env = os.environ.get("AIRGAP_LLM_WHEELS")
    if env:
        return Path(env)

    return cache_root() / "wheels"


def _run(cmd: list[str], what: str, hint: str, extra_env: dict[str, str] | None = None) -> str:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", **(extra_env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join(out[-20:])
        log = Path(tempfile.gettempdir()) / f"airgap-llm-{what.split()[0]}.log"
        log.write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
        raise BundlerError(f"{what} failed (exit {proc.returncode}):\n{tail}", hint=f"{hint}; full output: {log}")
    return proc.stdout


def compile_lock(requirements: list[str], out: Path) -> list[tuple[str, str]]:
    """pip-compile requirements into out (with hashes); return [(name, version)]."""
    out.parent.mkdir(parents=True, exist_ok=True)
    req_in = out.with_suffix(".in")
    req_in.write_text("\n".join(requirements) + "\n")
    _run([sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
          "--strip-extras", "--no-header", "--no-annotate", "--no-emit-index-url", "--output-file", str(out),
          str(req_in)],
         f"pip-compile of {', '.join(requirements)}",
         "check that the names and versions exist on the index and that the index is reachable")
    return pins(out)


def pins(lock_file: Path) -> list[tuple[str, str]]:
    try:
        return [(n, v) for n, (v, _) in parse(lock_file.read_text()).items()]
    except ValueError as e:
        raise BundlerError(f"{lock_file}: {e}", hint="delete it and bundle again")


def local_pythons(py: str) -> list[str]:
    """The pythonX.Y (py = "X.Y") executables on this machine: on PATH, then pyenv's versions of it."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = [shutil.which(f"python{py}"), *map(str, sorted(pyenv.glob(f"{py}.*/bin/python{py}")))]
    return [exe for exe in found if exe]


def platform_tags(machine: str | None = None) -> list[str]:
    machine = machine or platform.machine()
    tags = [f"manylinux_2_{n}_{machine}" for n in (17, 24, 27, 28, 31, 34)]
    tags += [f"manylinux2014_{machine}", f"manylinux1_{machine}"]
    return tags


def download(lock_file: Path, dest: Path, python: str | None = None) -> list[Path]:
    """Download every pin of lock_file into dest (pip checks each hash). With `python`
    ("3.9"), fetch the binary wheels for that interpreter on this architecture."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
           "--only-binary=:all:", "--dest", str(dest), "-r", str(lock_file)]
    if python:
        nodot = python.replace(".", "")
        cmd += ["--python-version", python, "--implementation", "cp", "--abi", f"cp{nodot}", "--abi", "abi3",
                "--abi", "none"]
        for tag in platform_tags():
            cmd += ["--platform", tag]
    _run(cmd, f"pip download for Python {python or 'of this machine'}",
         "a pinned package may have no wheel for that Python or platform; drop that Python from "
         "target.pythons or pin another version")
    return files_for(pins(lock_file), dest)


def files_for(wanted: list[tuple[str, str]], folder: Path) -> list[Path]:
    want = set(wanted)
    found = []
    for p in sorted(folder.iterdir()):
        m = WHEEL_RE.match(p.name)
        if m and (normalize(m.group("name")), m.group("ver")) in want:
            found.append(p)
    return found


def write_install_lock(wheels_dir: Path, out: Path) -> list[str]:
    """Write `name==version --hash=…` for each wheel file actually in wheels_dir."""
    from .manifest import sha256_file

    groups: dict[tuple[str, str], list[str]] = {}
    for p in sorted(wheels_dir.glob("*.whl")):
        m = WHEEL_RE.match(p.name)
        if not m:
            raise BundlerError(f"{p}: not a wheel file name", hint="remove it from the bundle's wheels/")
        groups.setdefault((normalize(m.group("name")), m.group("ver")), []).append(sha256_file(p))
    lines = []
    for (name, ver), hashes in sorted(groups.items()):
        hs = " ".join(f"--hash=sha256:{h}" for h in sorted(hashes))
        lines.append(f"{name}=={ver} {hs}")
    out.write_text("# written from the wheels in this bundle; install with --require-hashes\n"
                   + "\n".join(lines) + "\n")
    return [n for n, _ in sorted(groups)]


def build_own_wheel(dest: Path) -> Path:
    """Build this project's wheel (the installer that runs on the box)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundlerError(f"cannot find the airgap-llm source tree above {Path(__file__).parent}",
                           hint="run the bundler from a clone of the repository (pip install -e .)")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("airgap_llm-*.whl"):
        old.unlink()
    # setuptools copies into build/lib and never removes what is gone from the source: a module
    # deleted or turned into a package would still ship in the installer's wheel
    shutil.rmtree(root / "build" / "lib", ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="airgap-wheel-") as td:
        # SOURCE_DATE_EPOCH: the same source gives the same wheel bytes, so re-bundling
        # unchanged code gives the same manifest and the box sees "nothing changed". Only for
        # this command: set in our own environment it reached the llama-server build, where
        # ggml reads it as "reproducible build" and silently turned AVX2/FMA off.
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir", "--wheel-dir", td,
              str(root)], "building the airgap-llm wheel", "check pyproject.toml",
             {"SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "315532800")})
        built = list(Path(td).glob("airgap_llm-*.whl"))
        target = dest / built[0].name
        os.replace(built[0], target)
    return target


def runtime_requirements() -> list[str]:
    """The package's own runtime dependencies (what the box needs), from pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:
        import tomli as tomllib  # type: ignore[no-redef]
    with open(root / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])
