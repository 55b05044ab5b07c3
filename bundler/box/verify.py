"""Step 1: every file of the bundle against its manifest, before anything changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..errors import VerifyError
from .report import info


def verify_bundle(bundle: Path, base: Path | None = None, dry: bool = False) -> tuple[dict[str, Any], bytes]:
    """Sizes and sha256 of every file (all problems reported at once); nothing is written but, for a delta
    bundle, the files it left to its base (copied in from --base, each hashed as it is). Returns the
    manifest and its bytes, read once: the signature is checked over those bytes, and every later
    step uses what they parsed to (a manifest swapped after the check is never read)."""
    from . import boot

    info(f"verifying {bundle} against its manifest")
    doc0, data = boot.manifest(bundle)  # the bytes bootstrap.py checked the signature of, never read again
    from .delta import fill_from_base

    # a delta bundle: what it left to its base, copied in and hashed (a dry run hashes it where it lies)
    checked = fill_from_base(bundle, doc0, base, write=not dry)
    doc, problems = mf.verify(bundle, show_progress=True, data=data)
    problems = [p for p in problems if not (p.kind == "missing" and p.path in checked)]
    if problems:
        lines = "\n".join("  " + p.describe() for p in problems)
        raise VerifyError(f"the bundle failed verification ({len(problems)} problem(s)); nothing was changed:\n"
                          f"{lines}", hint="copy the bundle again from its source; check it with: "
                          "sha256sum -c SHA256SUMS" + (" (a delta bundle: once install.sh --base has filled it in)"
                                                       if doc.get("delta") else ""))
    info(f"verified {len(doc['files'])} files")
    return doc, data


def join_split_files(bundle: Path, doc: dict[str, Any]) -> None:
    """Files carried in parts, joined from their verified parts (once the signature holds, and
    not on a dry run: the first write into the bundle)."""
    for e in mf.entries_of(doc):
        if e.parts and not mf._whole_ok(bundle, e):
            info(f"joining {e.path} from {len(e.parts)} verified parts")
            mf.join_parts(bundle, e)
