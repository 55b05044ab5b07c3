#!/usr/bin/env python3
"""Compare two llama-server builds on the same model: tok/s at concurrency 1 and 4.

usage: python benchmarks/llama_build_speed.py BIN_A BIN_B MODEL.gguf [ROUNDS]

Each round starts A then B (same flags, all cores), benches each with `bundler bench`'s
sweep (64-token prompts, 128 output tokens) and stops it; the figures are the medians
over rounds, so a noisy shared machine skews both alike. Prints the ratio B / A.
Used to check that the portable (zig, glibc 2.27) CPU build is as fast as the gcc one.
"""

import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bundler import bench  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_bench(binary: str, model: str) -> dict[int, float]:
    port = free_port()
    proc = subprocess.Popen([binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", "4",
                             "-c", "4096", "-t", str(os.cpu_count() or 2), "--api-key", "k"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{binary} did not become healthy")
            time.sleep(0.3)
        rep = bench.sweep(f"http://127.0.0.1:{port}/v1", "k", "m", [1, 4], None, 64, 128, progress=False)
        return {lv["concurrency"]: lv["tok_s"] for lv in rep["levels"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    a, b, model = sys.argv[1:4]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    runs: dict[str, list[dict[int, float]]] = {a: [], b: []}
    for _ in range(rounds):
        for binary in (a, b):
            runs[binary].append(serve_and_bench(binary, model))
    print(f"{'build':<60} {'c1 tok/s':>9} {'c4 tok/s':>9}")
    med = {}
    for binary in (a, b):
        med[binary] = {c: statistics.median(r[c] for r in runs[binary]) for c in (1, 4)}
        print(f"{binary[-60:]:<60} {med[binary][1]:>9.1f} {med[binary][4]:>9.1f}")
    print(f"B / A: {med[b][1] / med[a][1]:.2f}x at concurrency 1, {med[b][4] / med[a][4]:.2f}x at 4 "
          f"(median of {rounds} rounds each)")


if __name__ == "__main__":
    main()
