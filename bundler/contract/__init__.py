"""The bundle → box contract: standard library only, importing nothing else of ours, so that
bootstrap.py and NAME.unpack.py can embed its files verbatim and check a bundle before any of the
bundle's own code runs (ed25519: signatures; trust: the one trust policy)."""

from pathlib import Path

EMBED_DROP = "# not embedded"


def embedded(path: Path, first: bool = False) -> str:
    """A module's text as bootstrap.py and NAME.unpack.py embed it: verbatim, less its imports
    marked EMBED_DROP (of what is embedded beside it) and, unless it comes first, its
    `from __future__` line (only the first statement of a file may be one)."""
    out = []
    for line in Path(path).read_text().splitlines(True):
        if line.startswith(("from ", "import ")) and EMBED_DROP in line:
            continue
        if not first and line.startswith("from __future__"):
            continue
        out.append(line)
    return "".join(out)
