#!/usr/bin/env python3
"""Stage batch N of a bundle directory for a size-limited transfer (the device tool
carries 64 MiB per call, like the gateways our users face): files are packed in
order into batches of at most LIMIT bytes and hard-linked under .carry/xfer/.

usage: xfer_batch.py BUNDLE_DIR N [LIMIT_MB]   → prints how many batches there are
       xfer_batch.py --all LIMIT_MB P DIR...      → every batch of the files of all DIRs at once, as
                                                   .carry/P01/DIR_NAME/..., .carry/P02/...: one per call
"""

import os
import shutil
import sys
from pathlib import Path


def batches(root: Path | list[Path], limit: int) -> list[list[Path]]:
    """First-fit decreasing: largest files first, each into the first batch it fits."""
    roots = root if isinstance(root, list) else [root]
    files = sorted((p for r in roots for p in r.rglob("*") if p.is_file()), key=lambda p: (-p.stat().st_size, str(p)))
    out: list[list[Path]] = []
    sizes: list[int] = []
    for f in files:
        s = f.stat().st_size
        if s > limit:
            sys.exit(f"{f} is {s} bytes, over the {limit}-byte limit: bundle with a smaller PART_SIZE")
        for i, used in enumerate(sizes):
            if used + s <= limit:
                out[i].append(f)
                sizes[i] += s
                break
        else:
            out.append([f])
            sizes.append(s)
    return out


def main_all(limit_mb: str, prefix: str, dirs: list[str]) -> None:
    roots = [Path(d).resolve() for d in dirs]
    bs = batches(roots, int(float(limit_mb) * (1 << 20)))
    for old in Path(".carry").glob(f"{prefix}[0-9][0-9]"):
        shutil.rmtree(old)
    for i, b in enumerate(bs, 1):
        for f in b:
            root = next(r for r in roots if f.is_relative_to(r))
            target = Path(".carry") / f"{prefix}{i:02d}" / root.name / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
        print(f".carry/{prefix}{i:02d}: {len(b)} files, {sum(f.stat().st_size for f in b) >> 20} MiB")


def main() -> None:
    if sys.argv[1] == "--all":
        return main_all(sys.argv[2], sys.argv[3], sys.argv[4:])
    root, n = Path(sys.argv[1]), int(sys.argv[2])
    limit = int(float(sys.argv[3]) * (1 << 20)) if len(sys.argv) > 3 else 58 << 20
    bs = batches(root, limit)
    dest = Path(".carry/xfer")
    shutil.rmtree(dest, ignore_errors=True)
    for f in bs[n]:
        target = dest / root.name / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)
    print(f"batch {n + 1} of {len(bs)}: {len(bs[n])} files, {sum(f.stat().st_size for f in bs[n]) >> 20} MiB")


if __name__ == "__main__":
    main()
