"""ExLlama behind TabbyAPI, its own OpenAI-compatible server, on NVIDIA GPUs, in two generations:
ExLlamaV2 for EXL2 models (TabbyAPI's branch exl2-checkpoint: its main dropped EXL2) and ExLlamaV3
for EXL3 (TabbyAPI's main). The model's quant_method names the generation (GENS, by format).

Box side: the wheels go into PREFIX/engines like vLLM's; tabby_run.py starts TabbyAPI with the
config below and a key written at start into a private folder. The bundle side (the lock, the
extension built for the box, TabbyAPI's pinned archive) is engines/exllama/build.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...errors import BundlerError
from ..base import HUB_OFFLINE_ENV, Engine, Launch

THIRD_PARTY = Path(__file__).resolve().parents[3] / "third_party"


@dataclass(frozen=True)
class Gen:
    """One ExLlama generation: its engine name (in plans and manifests, and TabbyAPI's `backend`), the
    model format it loads, its spec table, and the TabbyAPI commit that serves it (as `git archive
    --prefix=tabbyAPI-COMMIT7/` writes it; third_party/README.md says how to make it again)."""

    name: str
    label: str
    fmt: str
    spec_key: str
    version: str  # the release bundled unless the spec pins another
    tabby_commit: str
    tabby_sha256: str
    tabby_branch: str
    build_time: str  # of the extension on this 2-core machine, as measured
    triton: bool  # attends with Triton kernels, which compile a C launcher at first use (as vLLM's)
    min_cc: float  # the compute capability its kernels need

    @property
    def tabby_archive(self) -> Path:
        return THIRD_PARTY / f"tabbyAPI-{self.tabby_commit[:7]}.tar.gz"

    @property
    def ext_module(self) -> str:
        return f"{self.name}_ext"


V2 = Gen("exllamav2", "ExLlamaV2", "exl2", "exllama", "0.3.2",  # 0.3.2: the last release (EXL2 is frozen)
         "79126f904c2e00aece026b36bb70bbb87e4892b2",
         "1d3d83324ac115f815e9e0f53dc2ba1b7dfb6e3463b7b21bdb303ba29b4c0ca4", "exl2-checkpoint", "15–20 min",
         triton=False, min_cc=7.0)


# 1.4.2: the release TabbyAPI's main pins (its own wheels are on GitHub only; PyPI has the sources)
V3 = Gen("exllamav3", "ExLlamaV3", "exl3", "exllamav3", "1.4.2",
         "e632af41eba68abeadc3437c62674360f2f8cbf1",
         "f0b6c886c85822d3045d709c47eec38c572dc7b5d2c561f8f0e0e572bb566041", "main", "about 21 min",
         triton=True, min_cc=8.0)
GENS = {g.name: g for g in (V2, V3)}
BY_FORMAT = {g.fmt: g for g in (V2, V3)}
FORMATS = tuple(BY_FORMAT)


def tabby_config(plan: Any, model_path: str, name: str, host: str, port: int) -> dict[str, Any]:
    """TabbyAPI's config for the plan (config_sample.yml names each key). JSON is YAML, so the file
    it reads is written with json; `airgap_llm` holds what tabby_run.py uses and removes."""
    model: dict[str, Any] = {
        "model_dir": "models", "model_name": name, "backend": plan.engine,
        "max_seq_len": plan.context_per_slot,
        # the KV cache holds every slot's context: TabbyAPI's cache_size is in tokens, all requests together
        # (ExLlama's cache is paged in 256 tokens: rounded up to whole pages)
        "cache_size": -(-plan.context_per_slot * max(1, plan.slots) // 256) * 256, "max_batch_size": max(1, plan.slots),
        "cache_mode": "FP16", "inline_model_loading": False, "use_dummy_models": False,
    }
    if plan.engine_defaults:  # what a user writes by hand: the model, nothing sized (--tune's reference)
        model = {k: model[k] for k in ("model_dir", "model_name", "backend")}
    elif plan.tensor_parallel > 1:
        model.update(tensor_parallel=True, tensor_parallel_backend="native", gpu_split_auto=True)
    elif plan.gpu_split_gib:
        model.update(gpu_split_auto=False, gpu_split=list(plan.gpu_split_gib))
    else:
        model.update(gpu_split_auto=True)
    return {
        # fetch requests: TabbyAPI downloads images named by URL in chat messages; never on an air-gapped box
        "network": {"host": host, "port": port, "disable_auth": False, "disable_fetch_requests": True,
                    "send_tracebacks": False, "api_servers": ["OAI"]},
        "logging": {"log_prompt": False, "log_generation_params": False, "log_requests": False},
        "model": model,
        "developer": {"unsafe_launch": False},
        "airgap_llm": {"model_path": model_path},
    }


def prove_extension(site: Path, engine: dict[str, Any]) -> str:
    """ExLlama's prebuilt extension imports with this box's torch (else exllamavN would try to compile
    it at the engine's start, with a compiler the box may not have, and fail long after the install).
    Returns what it imported (torch, CUDA, the extension's file)."""
    gen = GENS[engine["name"]]
    code = (f"import torch, {gen.ext_module}, {gen.name}.ext as e; "
            f"print(torch.__version__, torch.version.cuda, e.{gen.ext_module}.__file__)")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(site)),
                           capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BundlerError(f"importing {gen.label}'s extension took over 10 minutes", hint="is the box very loaded?")
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise BundlerError(f"{gen.label}'s extension ({engine.get('extension', gen.ext_module)}) does not import with "
                           f"this box's python {sys.executable}: {' | '.join(tail)}; nothing was started",
                           hint="the bundle was made for another Python, torch or CUDA: make the probe file here "
                                "(./install.sh --probe > box.json) and bundle again with TARGET=box.json")
    return r.stdout.strip()


def launch(ctx) -> Launch:
    """TabbyAPI (tabby_run.py) with the engine's wheels (the box's torch stays where it is), then the
    release's own site, and a config for the plan."""
    gen = GENS[ctx.plan.engine]
    site = ctx.site()
    ctx.say(f"{gen.label}'s extension imports (torch, CUDA, file: {prove_extension(site, ctx.entry)})")
    tabby = ctx.copy(ctx.entry["tabbyapi"], "tabbyapi")
    conf = ctx.write(f"tabbyapi-{ctx.port}.json", json.dumps(
        tabby_config(ctx.plan, ctx.model_path, ctx.name, ctx.host, ctx.port), indent=2) + "\n")
    argv = [ctx.python, "-m", "bundler.engines.tabby_run", str(tabby), str(conf)]
    env = {"PYTHONPATH": f"{site}:{ctx.final / 'site'}", **HUB_OFFLINE_ENV}
    # TabbyAPI's working folder of each start (tabby_run.py), and ExLlama's own kernel caches
    cache = {"AIRGAP_LLM_RUN_DIR": "run", "TRITON_CACHE_DIR": "triton", "TORCH_EXTENSIONS_DIR": "torch-ext"}
    if gen is V2:
        # no bundle carries flash-attn, yet exllamav2 leaves its config's no_flash_attn off without it, so
        # TabbyAPI picks the paged generator and the load fails on cc >= 8 ("Paged attention required Flash
        # Attention 2.5.7", ../shared/EXLLAMA.md); with this set TabbyAPI serves in its compatibility mode,
        # one request at a time, as the plan says
        env["EXLLAMA_NO_FLASH_ATTN"] = "1"
    if gen.triton:  # ExLlamaV3 attends with Triton kernels, which compile a C launcher at first use
        ctx.triton_cc(ctx.triton_tools(), site, env, cache)
    return Launch(argv, env, cache)


def override(plan, facts, hw, tp: int | None, dp: int | None):
    """TabbyAPI runs one replica, tensor parallel over every GPU or on one with a layer split."""
    tp = tp or plan.tensor_parallel
    if (dp or 1) != 1 or tp not in (1, len(hw.gpus)):
        raise BundlerError(f"{GENS[plan.engine].label} (TabbyAPI) runs one replica, tensor parallel over all "
                           f"{len(hw.gpus)} GPU(s) or on one with a layer split; --tensor-parallel {tp}"
                           + (f" --data-parallel {dp}" if dp else "") + " is neither",
                           hint=f"use --tensor-parallel {len(hw.gpus)} or 1, without --data-parallel")
    return replace(plan, tensor_parallel=tp, gpu_split_gib=() if tp > 1 else plan.gpu_split_gib,
                   reasons=(*plan.reasons, f"overridden on the command line: tensor parallel {tp}"))


def summary(plan) -> str:
    return f"TP {plan.tensor_parallel}, split {list(plan.gpu_split_gib)}, {plan.slots} × {plan.context_per_slot} tokens"


from . import plan as xplan  # noqa: E402 - its planner needs the generations above

# TabbyAPI's own auth guards its API routes; tabby_run.py's middleware adds /docs and /openapi.json
ENGINES = tuple(Engine(g.name, g.label, (g.fmt,), triton=g.triton, slow_start=True, python=True,
                       reference="TabbyAPI with only the model named in its config",
                       guarded=(("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/model/unload"),
                                ("POST", "/v1/model/load"), ("GET", "/openapi.json"), ("GET", "/docs")),
                       launch=launch, override=override, summary=summary, plan=xplan.plan)
                for g in (V2, V3))
