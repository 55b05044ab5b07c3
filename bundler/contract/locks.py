"""Lock files and wheel names: the one parser of `name==version --hash=sha256:…` locks (pip-compile's,
uv's, the bundle's own), used by the bundler and the box alike. Standard library only."""

from __future__ import annotations

import re

WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<ver>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")
PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
HASH_RE = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def normalize(name: str) -> str:
    """A project name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(text: str) -> dict[str, tuple[str, list[str]]]:
    """{normalized name: (version, [sha256, …])}, in the lock's order, from a lock whose hashes sit on
    the pin's line or on the continuation lines below it; comments, blank lines and pip's option
    lines (--find-links …) ignored. A line that is none of these raises ValueError naming it."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("--hash") else raw.strip()
        if not line:
            continue
        m = PIN_RE.match(line)
        if m:
            current = normalize(m.group(1))
            pins[current] = (m.group(2), HASH_RE.findall(line))
            rest = HASH_RE.sub("", line[m.end():]).replace("\\", "").strip()
            if rest and not rest.startswith(";"):
                raise ValueError(f"cannot read the line {raw!r}")
        elif line.startswith("-") and not line.startswith("--hash"):
            continue  # pip's own options (--find-links, --index-url …): nothing to pin
        elif current and line.startswith("--hash"):
            pins[current][1].extend(HASH_RE.findall(line))
            if not HASH_RE.fullmatch(line.rstrip("\\ ").strip()):
                raise ValueError(f"cannot read the line {raw!r}")
        else:
            raise ValueError(f"cannot read the line {raw!r}")
    return pins
