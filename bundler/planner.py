"""plan(model, hardware, intent) → Plan: which engine, with which parameters, and why.

Pure: no I/O. Every number it sets comes with a reason a person can check, and
every engine it did not pick is listed with why. Intent is the load to serve:
target concurrency and tokens per request (prompt + answer).

Engines (docs/DESIGN.md):
- GGUF → llama.cpp's llama-server: all layers on the GPUs when weights + KV for
  the target load fit; else partial offload (-ngl); no usable GPU → CPU.
- safetensors → vLLM: smallest tensor-parallel size that fits weights + KV for
  the load, a power of two that divides the attention heads and divides or is
  a multiple of the KV heads; GPUs left over become data-parallel replicas.
- EXL2 → ExLlamaV2, EXL3 → ExLlamaV3 (TabbyAPI; the generation from quant_method): one GPU, GPU
  split, or tensor parallel on NVLink. ExLlamaV2 batches only with flash-attn (paged attention);
  without it one request at a time, and the plan says which build would serve the load instead.

The memory model: bundler/sizing.py (common) and each engine's plan.py (its own constants).
Each engine plans the formats it serves (engines/NAME/plan.py, the engine's `plan`); this module
picks the engine by the model's format and shares the box among the bundle's models.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from .errors import PlanRefused
from .modelinfo import ModelInfo
from .probe import Hardware
# the common ground, and each engine's sizing that callers use, under the names they always had
from .sizing import (BASE_OVERHEAD, CUDA_DRIVER_MIN, EMBED_CONTEXT, EMBED_THREADS_SHARE, GPU_SHARE, KV_BYTES,  # noqa: F401
                     MAX_CONCURRENCY, MAX_CONTEXT, MIN_CONTEXT, RAM_FRACTION, SLOT_OVERHEAD, GiB, Intent, MiB, Offer,
                     Plan, explain, gib, kv_per_gpu_per_token, less, ram_needed, tp_candidates)
from .versions import version_tuple  # noqa: F401 - planner.version_tuple, as before


def _engines():
    from . import engines

    return engines


_VLLM_NAMES = ("VLLM_UTILIZATION", "VLLM_OVERHEAD", "VLLM_QUANT_MIN_CC", "vllm_max_num_seqs",
               "vllm_default_max_num_seqs", "vllm_api_servers", "plan_cluster")


def __getattr__(name: str) -> Any:
    """vLLM's sizing under the planner's old names (planner.vllm_max_num_seqs, planner.plan_cluster, ...):
    imported on first use, so that the engines' own planners (which import bundler.sizing) load first.
    Any other name is missing at once: the import system asks modules for names such as __path__ (Python
    3.9's zipimport does, mid-import), and importing anything for those recursed."""
    if name == "ALL_ENGINES":
        return all_engines()
    if name not in _VLLM_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .engines.vllm import plan as vplan

    return getattr(vplan, name)


def all_engines() -> tuple[str, ...]:
    """Every engine offered, as a bundle that carries all of them offers them (llama.cpp by backend)."""
    return tuple(n for e in _engines().registry().values() for n in (e.offered_as or (e.name,)))


def plan(model_name: str, info: ModelInfo, hw: Hardware, intent: Intent,
         engines_available: tuple[str, ...] = ("cpu",), cpu_flags_needed: tuple[str, ...] = (),
         cuda: str = "13", cpu_variants: tuple[str, ...] = (), cuda_cpu_flags: tuple[str, ...] = (),
         task: str = "chat", vllm_utilization: float = GPU_SHARE) -> Plan:
    """Choose the engine and its parameters for serving `info` on `hw` at `intent`: the engine that
    serves the model's format plans it (engines/NAME/plan.py). `cpu_variants`: the CPU backends the
    bundled llama-server carries (ggml loads the best this CPU runs)."""
    offer = Offer(tuple(engines_available), tuple(cpu_flags_needed), cuda, tuple(cpu_variants), tuple(cuda_cpu_flags),
                  vllm_utilization)
    engines = _engines()
    engine = engines.for_format(info.format)
    if engine is None or engine.plan is None:
        raise PlanRefused(f"{model_name}: unknown format {info.format!r}",
                          hint=f"use one of: {', '.join(f.upper() for f in engines.formats())}")
    if task == "embed" and not engine.embeds:
        can = [e for e in engines.registry().values() if e.embeds]
        formats = " or ".join(f for e in can for f in e.formats)
        raise PlanRefused(f"{model_name}: an embedding model must be {formats} (served by "
                          f"{' or '.join(e.label for e in can)}), not {info.format}",
                          hint=f"bundle a {formats} build of it")
    return engine.plan(model_name, info, hw, intent, task, offer)


def plan_models(models: list[tuple[str, ModelInfo, str]], hw: Hardware, intent: Intent, **engines: Any) -> list[Plan]:
    """Plans for every model of a bundle, (name, facts, task) each, the first the main (chat) model.
    The others (an embedding model, say) are planned first, small; the main model gets what they
    leave: RAM, GPU memory and, for vLLM, the share of --gpu-memory-utilization; and says so."""
    extra: list[Plan] = []
    ram = 0
    gpu = [0.0] * len(hw.gpus)
    for name, info, task in models[1:]:
        p = plan(name, info, less(hw, ram, gpu), intent, task=task, **engines)
        extra.append(p)
        if p.backend == "cuda":
            for i, g in enumerate(p.memory_per_gpu_gib[:len(gpu)]):
                gpu[i] += g
        else:
            ram += p.ram_bytes
    name, info, task = models[0]
    if not extra:
        return [plan(name, info, hw, intent, task=task, **engines)]
    worst = max((g * GiB / (hw.gpus[i].memory_total_mib * MiB) for i, g in enumerate(gpu)), default=0.0)
    util = round(GPU_SHARE - math.ceil(worst * 100) / 100, 2)
    if util < 0.3 and any(p.backend == "cuda" for p in extra):
        raise PlanRefused(f"the bundle's other models ({', '.join(p.model for p in extra)}) would take "
                          f"{worst:.0%} of a GPU's memory, leaving {name} too little",
                          hint="serve the embedding model on the CPU (a GGUF build), or use a GPU with more memory")
    # an engine that sizes itself to a share of each GPU gets the others' memory off that share instead
    shares = getattr(_engines().for_format(info.format), "gpu_share", 0.0)
    main = plan(name, info, less(hw, ram, gpu if not shares else [0.0] * len(gpu)), intent,
                task=task, vllm_utilization=util, **engines)
    took = "; ".join(f"{p.model} ({p.task}, {p.engine} {p.backend}: " +
                     (f"{gib(sum(p.memory_per_gpu_gib) * GiB)} GPU memory)" if p.backend == "cuda"
                      else f"{gib(p.ram_bytes)} RAM, {p.threads} thread(s))") for p in extra)
    main = replace(main, reasons=(*main.reasons, f"planned with what the bundle's other models leave: {took}"))
    return [main, *extra]
