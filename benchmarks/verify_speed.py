#!/usr/bin/env python3
"""Verify speed against this machine's sha256 ceiling (one core's hashlib rate × cores).

Writes a bundle-shaped directory of SIZE_GB (two big files, which get per-chunk
hashes, plus many small ones), builds its manifest, then times `manifest.verify`
with the data in the page cache (the hashing, not the disk, is measured).

usage: python benchmarks/verify_speed.py [SIZE_GB]   (default 3)
"""

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bundler import manifest  # noqa: E402


def one_core_rate(mb: int = 512) -> float:
    data = os.urandom(16 << 20)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(mb // 16):
        h.update(data)
    return mb * (1 << 20) / (time.perf_counter() - t0)


def main() -> None:
    size = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="verify-bench-") as td:
        root = Path(td) / "b"
        (root / "models").mkdir(parents=True)
        (root / "wheels").mkdir()
        block = os.urandom(64 << 20)
        big = int(size * 0.45 * (1 << 30))
        for name in ("models/a.gguf", "models/b.gguf"):
            with open(root / name, "wb") as f:
                for _ in range(big // len(block)):
                    f.write(block)
        small = int(size * 0.1 * (1 << 30))
        for i in range(small // (4 << 20)):
            (root / "wheels" / f"w{i}.whl").write_bytes(block[: 4 << 20])
        manifest.write(root, {"name": "bench"}, manifest.scan(root))
        total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        manifest.verify(root, show_progress=False)  # warm the page cache
        t0 = time.perf_counter()
        _, problems = manifest.verify(root, show_progress=False)
        secs = time.perf_counter() - t0
    rate = one_core_rate()
    ceiling = rate * cores
    got = total / secs
    print(f"bundle {total / 1e9:.2f} GB, {cores} cores, problems {len(problems)}")
    print(f"sha256 one core     {rate / 1e9:.2f} GB/s")
    print(f"ceiling (x{cores})       {ceiling / 1e9:.2f} GB/s")
    print(f"verify              {got / 1e9:.2f} GB/s  = {got / ceiling:.2f} of the ceiling")


if __name__ == "__main__":
    main()
