"""A model file on this machine (path or file:// URL)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BundlerError
from ..spec import ModelSpec
from . import copy_into_cache


def fetch(model: ModelSpec, log=print) -> Path:
    src = model.source[len("file://"):] if model.source.startswith("file://") else model.source
    path = Path(src).expanduser()
    if not path.is_file():
        raise BundlerError(f"model source {path}: no such file", hint="fix models.source in the spec")
    log(f"model {model.file}: copying from {path}")
    return copy_into_cache(path, model)
