"""Directories that appear whole or not at all: a bundle, a release, an engine's
wheels, a cached build or toolchain are filled beside their final place and
renamed into it only once complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(final: Path, stage: Path | None = None) -> Iterator[Path]:
    """Yield an empty directory beside `final` to fill; when the block ends without an error it
    replaces `final` (an old one is removed), on any error (an interrupt too) it is removed and
    `final` is left as it was. `stage` names that directory (a leftover of a killed run is
    cleared first); by default it is a fresh temporary name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if stage is None:
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    else:
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
    try:
        yield stage
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
