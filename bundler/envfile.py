"""The service's env file: KEY=VALUE lines, read as data (by systemd's EnvironmentFile= or by
the supervisor), never executed as shell. Standard library only."""

from __future__ import annotations

import re
from pathlib import Path

_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def parse(text: str, where: str = "env file") -> dict[str, str]:
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{where}:{n}: not KEY=VALUE: {raw[:80]!r}")
        out[m.group(1)] = m.group(2)
    return out


def read(path: Path) -> dict[str, str]:
    return parse(path.read_text(), str(path))
