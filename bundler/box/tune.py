"""--tune and --bench --baseline: start the plan and its alternatives on this box, one after
another, bench each at the same load, and keep the fastest.

Each candidate is a real release (the same launch script, unit or supervisor, engine account and
key as the installed service), built beside the others under PREFIX/NAME/releases/tune-*, started
on the service's own port, benched with `bundler bench`, stopped and removed. vLLM's wheels and
the kernel caches are shared, so a candidate costs an engine start, not an install.

The engine started with its own defaults (`vllm serve MODEL`, `llama-server -m MODEL`: what a user
does by hand) is benched too, as the reference every ratio is taken against; it is never installed.
A candidate replaces the plan only when it beats it by more than NOISE at the target load: two
runs of one configuration differ by a few per cent on a shared box (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .. import planner
from .. import engines
from ..errors import BundlerError
from ..modelinfo import ModelInfo
from ..probe import Hardware
from . import listener
from .health import LogWatch, wait_healthy
from .layout import Layout
from .report import info, warn
from .service import ctl, engine_alive, start

NOISE = 0.03
PROMPT_TOKENS = 400
MIN_REQUESTS = 8  # per level: one wave, and at least this many (single-stream figures of 4 moved by 5-10 %)


@dataclass(frozen=True)
class Candidate:
    label: str
    plan: planner.Plan
    why: str
    reference: bool = False  # benched for comparison, never installed (the engine's own defaults)


def reference(plan: planner.Plan) -> Candidate:
    """The engine as a user starts it by hand, with the same model, port and key."""
    return Candidate("engine defaults", replace(plan, engine_defaults=True, extra_args=()),
                     engines.get(plan.engine).reference, reference=True)


def candidates(plan: planner.Plan, facts: ModelInfo, hw: Hardware, engine_version: str = "") -> list[Candidate]:
    """The plan first, then the engine's defaults, then the alternatives worth a start on this box."""
    out = [Candidate("plan", plan, "as planned"), reference(plan)]
    engine = engines.get(plan.engine)
    if engine.alternatives is not None:
        out += [Candidate(label, p, why) for label, p, why in engine.alternatives(plan, facts, hw, engine_version)]
    return out


@dataclass
class Runner:
    """Builds, starts, benches and removes candidate releases for one install."""

    build: Callable[[planner.Plan, str], Path]  # (plan, release id) → a built release
    layout: Layout
    mode: str
    base: str
    key: str
    model: str
    timeout: float
    levels: tuple[int, ...]
    max_tokens: int

    def run(self, c: Candidate, index: int) -> dict[str, Any]:
        from .. import bench

        digest = hashlib.sha256(json.dumps(c.plan.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        rid = f"tune-{index}-{digest}"
        row: dict[str, Any] = {"label": c.label, "why": c.why, "reference": c.reference,
                               "flags": flags_of(c.plan), "levels": [], "error": ""}
        t0 = time.monotonic()
        release = self.build(c.plan, rid)
        patterns = engines.get(c.plan.engine).fatal_log
        watch = (LogWatch(patterns, unit=self.layout.unit) if self.mode == "systemd"
                 else LogWatch(patterns, self.layout.logfile))
        try:
            start(release, self.mode, self.layout)
            row["start_s"] = round(wait_healthy(self.base, self.timeout, self.layout.log_hint(self.mode),
                                                lambda: engine_alive(release, self.layout, self.mode), watch), 1)
            port = int(self.base.rsplit(":", 1)[1])
            listener.require_ours(self.layout, self.mode, [port])
            report = bench.sweep(self.base + "/v1", self.key, self.model, list(self.levels), None, PROMPT_TOKENS,
                                 self.max_tokens, progress=False,
                                 min_requests=MIN_REQUESTS,
                                 before_level=lambda _c: listener.require_ours(self.layout, self.mode, [port]))
            row["levels"] = report["levels"]
            bad = [lv for lv in report["levels"] if lv["errors"]]
            if bad:
                row["error"] = f"{bad[0]['errors']} failed requests at {bad[0]['concurrency']}: {bad[0]['first_error']}"
        except BundlerError as e:
            row["error"] = e.message
        finally:
            ctl(release, "stop")
            shutil.rmtree(release, ignore_errors=True)
        row["seconds"] = round(time.monotonic() - t0, 1)
        return row


def flags_of(plan: planner.Plan) -> str:
    if plan.engine_defaults:
        return "(the engine's own defaults)"
    summary = engines.get(plan.engine).summary
    s = summary(plan) if summary else "as planned"
    return s + (" " + " ".join(plan.extra_args) if plan.extra_args else "")


def tok_s(row: dict[str, Any], level: int) -> float:
    return next((lv["tok_s"] for lv in row["levels"] if lv["concurrency"] == level), 0.0)


def ratios(row: dict[str, Any], ref: dict[str, Any], levels: tuple[int, ...]) -> dict[str, float]:
    """row's tok/s over ref's at each level where ref served ("1": 1.02, ...)."""
    return {str(lv): round(tok_s(row, lv) / tok_s(ref, lv), 3) for lv in levels if tok_s(ref, lv)}


def choose(rows: list[dict[str, Any]], target: int) -> int:
    """Index of the row to install: the fastest at the target load that failed no request, the
    plan (row 0) unless another beats it by more than NOISE."""
    ok = [i for i, r in enumerate(rows) if not r["reference"] and not r["error"] and r["levels"]]
    if not ok:
        return 0
    best = max(ok, key=lambda i: tok_s(rows[i], target))
    if 0 in ok and tok_s(rows[best], target) <= tok_s(rows[0], target) * (1 + NOISE):
        return 0
    return best


def table(rows: list[dict[str, Any]], levels: tuple[int, ...], chosen: int | None) -> str:
    ref = next((r for r in rows if r["reference"] and not r["error"]), None)
    head = f"{'':2}{'candidate':<24} " + " ".join(f"{'c=' + str(c):>9}" for c in levels)
    head += "  vs defaults" if ref else ""
    lines = [head + "  start  flags"]
    for i, r in enumerate(rows):
        mark = "*" if i == chosen else " "
        figs = " ".join(f"{tok_s(r, c):>9.1f}" for c in levels)
        ratio = ""
        if ref:
            ratio = "  " + " ".join(f"{tok_s(r, c) / tok_s(ref, c):.2f}" if tok_s(ref, c) else "  - "
                                    for c in levels)
        line = f"{mark} {r['label']:<24} {figs}{ratio}  {r.get('start_s', 0):>5.0f}s  {r['flags']}"
        if r["error"]:
            line = f"{mark} {r['label']:<24} failed: {r['error'][:160]}  ({r['flags']})"
        lines.append(line)
    lines.append("(output tok/s at each concurrency; * = installed)" if chosen is not None else "(output tok/s)")
    return "\n".join(lines)


def tune(runner: Runner, cands: list[Candidate], budget: float, target: int) -> tuple[planner.Plan, dict[str, Any]]:
    """Run the candidates within `budget` seconds (the plan always) and choose one."""
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    info(f"tuning: {len(cands)} candidates, budget {budget / 60:.0f} min, each benched at "
         f"{', '.join(map(str, runner.levels))} concurrent requests ({runner.max_tokens} output tokens)")
    for i, c in enumerate(cands):
        spent = time.monotonic() - t0
        each = spent / len(rows) if rows else 0.0
        if i > 0 and spent + each > budget:
            warn(f"tune budget spent ({spent / 60:.1f} of {budget / 60:.0f} min): skipping " +
                 ", ".join(x.label for x in cands[i:]))
            rows += [{"label": x.label, "why": x.why, "reference": x.reference, "flags": flags_of(x.plan),
                      "levels": [], "error": "skipped: tune budget spent"} for x in cands[i:]]
            break
        info(f"tuning [{i + 1}/{len(cands)}] {c.label}: {flags_of(c.plan)}")
        row = runner.run(c, i)
        rows.append(row)
        info(f"  {c.label}: " + (row["error"] or ", ".join(f"{tok_s(row, lv):.1f} tok/s at {lv}"
                                                          for lv in runner.levels)))
    level = target if target in runner.levels else max(runner.levels)
    chosen = choose(rows, level)
    info(table(rows, runner.levels, chosen))
    report = {"levels": list(runner.levels), "target": level, "budget_s": budget,
              "seconds": round(time.monotonic() - t0, 1), "prompt_tokens": PROMPT_TOKENS,
              "max_tokens": runner.max_tokens, "noise": NOISE, "chosen": rows[chosen]["label"], "candidates": rows}
    ref = next((r for r in rows if r["reference"] and not r["error"]), None)
    if ref:
        report["vs_defaults"] = ratios(rows[chosen], ref, runner.levels)
    plan = cands[chosen].plan
    if chosen:
        plan = replace(plan, reasons=(*plan.reasons, f"--tune: {cands[chosen].label} served "
                                      f"{tok_s(rows[chosen], level):.0f} tok/s at {level} concurrent requests "
                                      f"against the plan's {tok_s(rows[0], level):.0f} (tune.json)"))
    return plan, report


def write_plot(report: dict[str, Any], path: Path) -> bool:
    from .. import bench

    reps = [(r["label"], {"levels": r["levels"]}) for r in report["candidates"] if r["levels"]]
    return bench.plot(reps, path, title="--tune: output tok/s by candidate")
