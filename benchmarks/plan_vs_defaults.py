#!/usr/bin/env python3
"""The plan exactly as installed against the engine's own defaults, on this machine, in one run:
`install.sh --bench --baseline` (the installer benches its service, stops it, starts the engine
with its own defaults on the same port, benches that, starts the service again) for the bundle's
own target load and for each --concurrency given, every figure at the same levels.

usage: python benchmarks/plan_vs_defaults.py BUNDLE_DIR [--levels 1,4,50] [--concurrency 50]
                                             [--max-tokens 128] [--rounds 2] [--out REPORT.json] [-- INSTALL_ARGS...]

Each target is measured in --rounds rounds (plan, defaults, plan, defaults, ...: the second
install of the same bundle changes nothing and benches again), because on a shared machine
whichever runs second was seen faster by up to 15 %. Prints one table (mean output tok/s and
plan/defaults of the means per level) and writes every report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def install_bench(bundle: Path, prefix: Path, levels: str, max_tokens: int, extra: list[str]) -> dict:
    cmd = [str(bundle / "install.sh"), "--prefix", str(prefix), "--bench", "--baseline", "--bench-levels", levels,
           "--bench-max-tokens", str(max_tokens), "--json", *extra]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"install.sh failed (exit {r.returncode})")
    return json.loads(r.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--levels", default="1,4,50")
    p.add_argument("--concurrency", default="", help="more targets to install with, e.g. 50")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    a.rest = rest
    runs = []
    with tempfile.TemporaryDirectory(prefix="plan-vs-defaults-") as td:
        os.chmod(td, 0o755)
        targets = [None] + [int(c) for c in a.concurrency.split(",") if c]
        for i, conc in enumerate(targets):
            extra = list(a.rest) + (["--concurrency", str(conc)] if conc else [])
            rounds = []
            for _ in range(a.rounds):
                res = install_bench(a.bundle.resolve(), Path(td) / f"p{i}", a.levels, a.max_tokens, extra)
                rounds.append({"bench": res["bench"], "baseline": res["baseline"]})
            subprocess.run([res["ctl"], "stop"], stderr=subprocess.DEVNULL)
            runs.append({"install_args": extra, "target": conc or "the bundle's", "rounds": rounds,
                         "plan": json.loads((Path(res["release"]) / "plan.json").read_text())})
    levels = [lv["concurrency"] for lv in runs[0]["rounds"][0]["bench"]["levels"]]

    def mean(rounds: list, pick) -> dict[int, float]:
        out = {}
        for c in levels:
            xs = [lv["tok_s"] for r in rounds for lv in pick(r) if lv["concurrency"] == c]
            out[c] = sum(xs) / len(xs)
        return out

    print(f"{'configuration (mean of ' + str(a.rounds) + ' rounds, output tok/s)':<52}"
          + "".join(f"{'c=' + str(c):>10}" for c in levels))
    for r in runs:
        plan = mean(r["rounds"], lambda x: x["bench"]["levels"])
        ref = mean(r["rounds"], lambda x: x["baseline"]["engine_defaults"]["levels"])
        r["mean_tok_s"] = {"plan": plan, "engine_defaults": ref,
                           "plan_over_defaults": {c: round(plan[c] / ref[c], 3) for c in levels}}
        label = f"plan as installed, target {r['target']} ({r['plan']['slots']} slots)"
        print(f"{label:<52}" + "".join(f"{plan[c]:>10.1f}" for c in levels))
        print(f"{'  llama-server defaults':<52}" + "".join(f"{ref[c]:>10.1f}" for c in levels))
        print(f"{'  plan / defaults':<52}" + "".join(f"{plan[c] / ref[c]:>9.2f}x" for c in levels))
    if a.out:
        a.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
