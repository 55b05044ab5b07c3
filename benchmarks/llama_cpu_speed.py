#!/usr/bin/env python3
"""The CPU llama-server a bundle ships, against independent references on the same machine, in
one run: a gcc build of the same sdist tuned for this very CPU (-march=native, GGML_NATIVE=ON),
and the shipped binary started with llama-server's own defaults (what a user does by hand).

usage: python benchmarks/llama_cpu_speed.py BUNDLE_DIR [--levels 1,4,16] [--out REPORT.json]

(A -march=native gcc build segfaults on this machine right after loading the model, so the
gcc reference is built for the shipped level's instruction sets instead.) Rows: the shipped
level, gcc, the shipped baseline x64 level (what every bundle shipped before), the shipped
level with llama-server's own defaults. The shipped binary runs with the plan's flags
(--parallel 4 --ctx-size 16384 --threads N --cont-batching), as an installed release does; the
gcc build with the same flags. Each is benched with `bundler bench` (400-token prompts, 128
output tokens, one wave per level), one after the other, and the ratios are printed. The gcc
build (a few minutes on 2 cores) is cached under ~/.cache/airgap-llm/llama-server/gcc-ref-KEY.
A shipped binary without the CPU's instruction sets shows as a ratio far below 1 (it was 0.25).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bundler import bench  # noqa: E402
from bundler.cache import cache_root  # noqa: E402


def gcc_build(sdist: Path, isa: list[str]) -> Path:
    """llama-server built by this machine's gcc 12 with the instruction sets of the shipped level
    (a reference, never shipped). -march=native would be the obvious one, but that build crashes
    on this machine before it serves (SIGSEGV right after loading the model), as do gcc builds
    with AMX; the shipped Zig build with AMX runs."""
    key = hashlib.sha256(f"{sdist.read_bytes()[:1 << 20]!r}{isa}{platform.machine()}".encode()).hexdigest()[:16]
    out = cache_root() / "llama-server" / f"gcc-ref-{key}"
    binary = out / "bin" / "llama-server"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory(prefix="llama-native-") as work:
        subprocess.run(["tar", "-xzf", str(sdist), "-C", work, "--wildcards", "*/vendor/llama.cpp/*"], check=True)
        src = next(Path(work).glob("*/vendor/llama.cpp"))
        print(f"building the gcc reference ({', '.join(isa)}) in {work} (a few minutes)", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(src), "-B", f"{work}/build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=OFF", *(f"-DGGML_{f}=ON" for f in isa), "-DBUILD_SHARED_LIBS=OFF",
                        "-DGGML_OPENMP=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
                        "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, CC="gcc", CXX="g++"))
        subprocess.run(["cmake", "--build", f"{work}/build", "--target", "llama-server", "-j", str(os.cpu_count())],
                       check=True, stdout=subprocess.DEVNULL)
        (out / "bin").mkdir(parents=True, exist_ok=True)
        os.replace(f"{work}/build/bin/llama-server", binary)
    return binary


def _level_isa(level: str) -> list[str]:
    """The ggml options of a level, read from the build script (one source of truth)."""
    script = (Path(__file__).resolve().parents[1] / "bundler" / "engines" / "build_llama_server.sh").read_text()
    m = re.search(rf"^{re.escape(level)}:(.*)$", script, re.M)
    return [f for f in (m.group(1).strip("\"").split(",") if m else []) if f]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_bench(label: str, argv: list[str], levels: list[int]) -> dict:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port), "--api-key", "k"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{label} did not become healthy; log: {log.name}")
            time.sleep(0.3)
        rep = bench.sweep(f"http://127.0.0.1:{port}/v1", "k", "m", levels, None, 400, 128, progress=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = Path(log.name).read_text(errors="replace")
    rep.update(label=label, argv=argv, log_head=text[:400])
    print(bench.table(rep), file=sys.stderr)
    return rep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    doc = json.loads((a.bundle / "manifest.json").read_text())
    cpu = next(e for e in doc["engines"] if e.get("backend") == "cpu")
    model = str(a.bundle / doc["models"][0]["file"])
    from bundler import probe
    from bundler.engines.llama_cpp import best_cpu_variant

    # the level an install on this machine runs (what the plan picks from the probe)
    level = best_cpu_variant(probe.probe(Path("/tmp")).cpu_flags, tuple(cpu.get("cpu_variants", ())))
    shipped = str(a.bundle / cpu["dir"] / "bin" / f"llama-server-{level}") if level else str(a.bundle / cpu["binary"])
    sdist = next((cache_root() / "wheels" / "sdists").glob("llama_cpp_python-*.tar.gz"))
    # without AMX: gcc builds with AMX (and -march=native) crash here right after loading the model;
    # Q4_K weights take no AMX path in ggml anyway (its AMX kernels serve Q4_0/Q4_1/Q8_0)
    isa = [f for f in _level_isa(level) if not f.startswith("AMX")]
    native = str(gcc_build(sdist, isa))
    threads = str(os.cpu_count() or 2)
    plan_flags = ["--parallel", "4", "--ctx-size", "16384", "--threads", threads, "--cont-batching"]
    runs = [serve_and_bench(f"shipped ({Path(shipped).name}), plan flags", [shipped, "-m", model, *plan_flags],
                            levels),
            serve_and_bench("gcc 12, same instruction sets, plan flags", [native, "-m", model, *plan_flags], levels),
            serve_and_bench("shipped llama-server-x64 (no AVX: the old build), plan flags",
                            [str(a.bundle / cpu["dir"] / "bin" / "llama-server-x64"), "-m", model, *plan_flags],
                            levels),
            serve_and_bench("shipped, llama-server's defaults", [shipped, "-m", model], levels)]
    tok = [{lv["concurrency"]: lv["tok_s"] for lv in r["levels"]} for r in runs]
    print(f"\n{'configuration (output tok/s)':<58}" + "".join(f" {'c=' + str(c):>9}" for c in levels))
    for r, t in zip(runs, tok):
        print(f"{r['label']:<58}" + "".join(f" {t[c]:>9.1f}" for c in levels))
    print("shipped / gcc:      " + ", ".join(f"{tok[0][c] / tok[1][c]:.2f}x at c={c}" for c in levels))
    print("shipped / x64:      " + ", ".join(f"{tok[0][c] / tok[2][c]:.2f}x at c={c}" for c in levels))
    print("plan / defaults:    " + ", ".join(f"{tok[0][c] / tok[3][c]:.2f}x at c={c}" for c in levels))
    if a.out:
        a.out.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "runs": runs}, indent=2)
                         + "\n")


if __name__ == "__main__":
    main()
