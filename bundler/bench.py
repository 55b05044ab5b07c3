"""Load test for any OpenAI-compatible endpoint: N chat requests at a set
concurrency (or a sweep of them), streamed, so time to first token is real.

Standard library only (plus tqdm), so it also runs on the box (`install.sh
--bench`). Reports output tok/s (all output tokens / wall time of the level),
time to first token and latency p50/p95, and errors; writes JSON and, where
matplotlib is importable, a PNG of tok/s against concurrency.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community "
         "name president team minute idea kid body information back parent face others level office door health "
         "person art war history party result change morning reason research girl guy moment air teacher").split()


@dataclass(frozen=True)
class Sample:
    ok: bool
    ttft: float
    latency: float
    output_tokens: int
    error: str = ""


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    tok_s: float
    ttft_p50: float
    ttft_p95: float
    latency_p50: float
    latency_p95: float
    first_error: str = ""


def prompt_of(tokens: int, seed: int) -> str:
    """About `tokens` tokens of plain words (one common English word is one token in
    the Llama, Gemma and Qwen tokenizers)."""
    rng = random.Random(seed)
    return "Continue this list of words: " + " ".join(rng.choice(WORDS) for _ in range(max(1, tokens - 8)))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return round(values[lo] + (values[hi] - values[lo]) * (k - lo), 4)


def one_request(url: str, key: str, model: str, prompt: str, max_tokens: int, timeout: float) -> Sample:
    u = urllib.parse.urlsplit(url.rstrip("/") + "/chat/completions")
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            # make every request produce max_tokens (llama-server and vLLM both honour these)
            "ignore_eos": True, "min_tokens": max_tokens}
    t0 = time.perf_counter()
    ttft = 0.0
    chunks = 0
    usage_tokens = 0
    try:
        conn = conn_cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=timeout)
        conn.request("POST", u.path, body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        if resp.status != 200:
            return Sample(False, 0, time.perf_counter() - t0, 0, f"HTTP {resp.status}: {resp.read(300)!r}")
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage_tokens = int(msg["usage"].get("completion_tokens") or 0)
            for ch in msg.get("choices") or []:
                delta = ch.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    if not ttft:
                        ttft = time.perf_counter() - t0
                    chunks += 1
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Sample(False, ttft, time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}")
    return Sample(True, ttft, time.perf_counter() - t0, usage_tokens or chunks)


def run_level(url: str, key: str, model: str, concurrency: int, requests: int, prompt_tokens: int,
              max_tokens: int, timeout: float = 600.0, progress: bool = True) -> Level:
    from .progress import bar as tqdm

    samples: list[Sample] = []
    lock = threading.Lock()
    bar = tqdm(total=requests, desc=f"concurrency {concurrency}", unit="req", disable=not progress)

    def task(i: int) -> None:
        s = one_request(url, key, model, prompt_of(prompt_tokens, i), max_tokens, timeout)
        with lock:
            samples.append(s)
            bar.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as ex:
        list(ex.map(task, range(requests)))
    wall = time.perf_counter() - t0
    bar.close()
    ok = [s for s in samples if s.ok]
    out = sum(s.output_tokens for s in ok)
    errors = [s for s in samples if not s.ok]
    return Level(concurrency=concurrency, requests=requests, errors=len(errors), output_tokens=out,
                 wall_s=round(wall, 3), tok_s=round(out / wall, 1) if wall else 0.0,
                 ttft_p50=_pct([s.ttft for s in ok], 0.5), ttft_p95=_pct([s.ttft for s in ok], 0.95),
                 latency_p50=_pct([s.latency for s in ok], 0.5), latency_p95=_pct([s.latency for s in ok], 0.95),
                 first_error=errors[0].error if errors else "")


def sweep(url: str, key: str, model: str, levels: list[int], requests: int | None, prompt_tokens: int,
          max_tokens: int, timeout: float = 600.0, progress: bool = True, min_requests: int = 4,
          before_level: Any = None) -> dict[str, Any]:
    """Every level in turn; before_level(concurrency), when given, runs first each time (the installer
    checks there that the port is still its service's before the key goes out again)."""
    results = []
    for c in levels:
        if before_level is not None:
            before_level(c)
        n = requests if requests else max(c, min_requests)  # one full wave at each level
        results.append(run_level(url, key, model, c, n, prompt_tokens, max_tokens, timeout, progress))
    return {"endpoint": url, "model": model, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "levels": [asdict(r) for r in results]}


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} at {report['endpoint']}: {report['prompt_tokens']}-token prompts, "
             f"{report['max_tokens']} output tokens",
             f"{'conc':>5} {'reqs':>5} {'err':>4} {'tok/s':>9} {'ttft p50':>9} {'ttft p95':>9} {'lat p50':>8} "
             f"{'lat p95':>8}"]
    for r in report["levels"]:
        lines.append(f"{r['concurrency']:>5} {r['requests']:>5} {r['errors']:>4} {r['tok_s']:>9.1f} "
                     f"{r['ttft_p50']:>8.2f}s {r['ttft_p95']:>8.2f}s {r['latency_p50']:>7.2f}s "
                     f"{r['latency_p95']:>7.2f}s")
        if r["first_error"]:
            lines.append(f"      first error: {r['first_error'][:200]}")
    return "\n".join(lines)


def plot(reports: list[tuple[str, dict[str, Any]]], path: Path, title: str = "throughput under load") -> bool:
    """PNG of output tok/s against concurrency, one line per report. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, rep in reports:
        xs = [r["concurrency"] for r in rep["levels"]]
        ys = [r["tok_s"] for r in rep["levels"]]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s (all requests)")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True

