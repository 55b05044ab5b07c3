"""plan(model, hardware, intent) → Plan: which engine, with which parameters, and why.

Pure: no I/O. Every number it sets comes with a reason a person can check, and
every engine it did not pick is listed with why.

Memory model for llama.cpp on the CPU (estimates, documented so they can be checked):
- weights: the GGUF file size (llama.cpp maps the file; every byte is touched).
- KV cache: layers × kv_heads × (head_dim_k + head_dim_v) × 2 bytes (f16) per
  token, for slots × context tokens (an upper bound: sliding-window layers
  need less).
- compute buffers and runtime: 256 MiB + 64 MiB per slot (llama-server's CPU
  compute buffer for a 2048-token batch is a few hundred MiB on small models).
- usable RAM: 85 % of MemAvailable, leaving room for the OS and page cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import PlanRefused
from .modelinfo import ModelInfo, fallback_template
from .probe import Hardware

GiB = 1 << 30
MiB = 1 << 20
RAM_FRACTION = 0.85
BASE_OVERHEAD = 256 * MiB
SLOT_OVERHEAD = 64 * MiB
MIN_CONTEXT = 512


@dataclass(frozen=True)
class Intent:
    concurrency: int
    context: int  # tokens per request


@dataclass(frozen=True)
class Plan:
    engine: str | None
    backend: str
    model: str
    threads: int
    slots: int
    context_per_slot: int
    gpu_layers: int
    total_layers: int
    tensor_parallel: int = 1
    data_parallel: int = 1
    ram_bytes: int = 0
    chat_template: str = ""  # built-in llama.cpp template when the GGUF carries none
    memory_per_gpu_gib: tuple[float, ...] = ()
    reasons: tuple[str, ...] = ()
    rejected: tuple[dict[str, str], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory_per_gpu_gib"] = list(self.memory_per_gpu_gib)
        d["reasons"] = list(self.reasons)
        d["rejected"] = list(self.rejected)
        return d


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def ram_needed(info: ModelInfo, slots: int, ctx: int) -> int:
    kv = info.kv_bytes_per_token() * slots * ctx
    return int(info.file_size + kv + BASE_OVERHEAD + SLOT_OVERHEAD * slots)


def plan(model_name: str, info: ModelInfo, hw: Hardware, intent: Intent,
         engines_available: tuple[str, ...] = ("cpu",), cpu_flags_needed: tuple[str, ...] = ()) -> Plan:
    if info.format != "gguf":
        raise PlanRefused(f"{model_name}: format {info.format} cannot be served by this bundle",
                          hint="bundle a GGUF build of the model")
    rejected: list[dict[str, str]] = [
        {"engine": "vllm", "why": "vLLM serves no GGUF (removed in 0.33); this model is GGUF"},
        {"engine": "exllamav2", "why": "ExLlamaV2 serves EXL2 only"},
    ]
    reasons: list[str] = []
    if hw.gpus and "cuda" not in engines_available:
        rejected.append({"engine": "llama.cpp (cuda)",
                         "why": f"the box has {len(hw.gpus)} GPU(s) but this bundle carries only a CPU "
                                "llama-server; bundle with backends = [\"cpu\", \"cuda\"] to use them"})
    elif not hw.gpus:
        rejected.append({"engine": "llama.cpp (cuda)", "why": "no NVIDIA GPU found (nvidia-smi absent or empty)"})
    missing_flags = [f for f in cpu_flags_needed if hw.cpu_flags and f not in hw.cpu_flags]
    if missing_flags:
        raise PlanRefused(f"this CPU lacks {', '.join(missing_flags)}, which the bundled llama-server needs",
                          hint="bundle on a machine like this box, or use a box with an x86-64-v3 CPU")

    threads = max(1, hw.cpus)
    reasons.append(f"llama.cpp on the CPU: GGUF model, no usable GPU engine; {threads} threads = CPU cores "
                   "available to this process")
    ctx = intent.context
    if info.context_length and ctx > info.context_length:
        reasons.append(f"context per request {ctx} capped at the model's trained context {info.context_length}")
        ctx = info.context_length
    slots = intent.concurrency
    budget = int(hw.ram_available * RAM_FRACTION)
    kv_tok = info.kv_bytes_per_token()
    need = ram_needed(info, slots, ctx)
    if need > budget:
        fit_ctx = ctx
        while fit_ctx > MIN_CONTEXT and ram_needed(info, slots, fit_ctx) > budget:
            fit_ctx //= 2
        fit_ctx = max(fit_ctx, MIN_CONTEXT)
        if ram_needed(info, slots, fit_ctx) <= budget:
            reasons.append(f"context per slot lowered from {ctx} to {fit_ctx}: {slots} slots × {ctx} tokens need "
                           f"{_gib(need)}, usable RAM is {_gib(budget)}")
            ctx = fit_ctx
        else:
            fit_slots = slots
            while fit_slots > 1 and ram_needed(info, fit_slots, MIN_CONTEXT) > budget:
                fit_slots -= 1
            if ram_needed(info, fit_slots, MIN_CONTEXT) > budget:
                short = ram_needed(info, 1, MIN_CONTEXT) - budget
                raise PlanRefused(
                    f"{model_name} does not fit in RAM: needs {_gib(ram_needed(info, 1, MIN_CONTEXT))} for one "
                    f"request of {MIN_CONTEXT} tokens, usable RAM is {_gib(budget)} (short by {_gib(short)})",
                    hint="free memory, add RAM, or bundle a smaller quantization of the model")
            reasons.append(f"slots lowered from {slots} to {fit_slots} at {MIN_CONTEXT} tokens each to fit "
                           f"usable RAM {_gib(budget)}")
            slots, ctx = fit_slots, MIN_CONTEXT
    else:
        reasons.append(f"{slots} slots (target concurrency) × {ctx} tokens each")
    need = ram_needed(info, slots, ctx)
    reasons.append(f"memory estimate {_gib(need)} = weights {_gib(info.file_size)} + KV cache "
                   f"{_gib(kv_tok * slots * ctx)} ({kv_tok / 1024:.1f} KiB/token) + buffers; "
                   f"usable RAM {_gib(budget)} of {_gib(hw.ram_available)} available")
    template = fallback_template(info)
    if template:
        reasons.append(f"the GGUF carries no chat template: using llama.cpp's built-in {template!r} "
                       f"for architecture {info.architecture}")
    elif not info.has_chat_template:
        reasons.append("the GGUF carries no chat template and none is known for "
                       f"{info.architecture}: llama-server falls back to chatml")
    return Plan(engine="llama.cpp", chat_template=template, backend="cpu", model=model_name, threads=threads,
                slots=slots, context_per_slot=ctx, gpu_layers=0, total_layers=info.layers, ram_bytes=need,
                reasons=tuple(reasons), rejected=tuple(rejected))
