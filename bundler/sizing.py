"""The planner's common ground (core: no I/O, no engine of its own): the load to plan for (Intent),
the plan (Plan), what the bundle offers (Offer), and the sizing every engine's planner shares.
Each engine plans its own formats in engines/NAME/plan.py; bundler/planner.py picks the engine.

Memory model (estimates, each constant with where it comes from):
- weights: the model's file size (GGUF) or safetensors bytes; llama.cpp keeps
  the output/embedding tensors as about one more layer's worth.
- KV cache per token: Σ layers × kv_heads × (head_dim_k + head_dim_v) × bytes
  per element (f16 2, q8_0 1.0625 = 34 bytes per 32 values, q4_0 0.5625 = 18 per
  32; ggml block sizes). Sliding-window layers are counted as full: an upper bound.
  With tensor parallel each GPU holds kv_heads / TP heads (at least one).
- each engine's own: in its plan module (llama.cpp on a GPU and on the CPU, vLLM's share of each
  GPU, ExLlama's overhead per GPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import PlanRefused
from .modelinfo import ModelInfo
from .probe import Gpu, Hardware
from .versions import version_tuple

# The share of each GPU's memory the engines of one service take together (vLLM's own default for its
# --gpu-memory-utilization): a vLLM model sizes itself to it, less what the bundle's other models take
GPU_SHARE = 0.90


@dataclass(frozen=True)
class Offer:
    """What the bundle carries, as the planner sees it: its engines by name (llama.cpp's builds by
    backend, "cpu" and "cuda"), the CPU instruction sets each llama.cpp build needs and the CPU
    levels it carries, the bundled CUDA major, and the share of each GPU a vLLM main model may take
    beside the bundle's other models."""

    engines: tuple[str, ...] = ("cpu",)
    cpu_flags_needed: tuple[str, ...] = ()
    cuda: str = "13"
    cpu_variants: tuple[str, ...] = ()
    cuda_cpu_flags: tuple[str, ...] = ()
    gpu_share: float = GPU_SHARE


GiB = 1 << 30


MiB = 1 << 20


RAM_FRACTION = 0.85


BASE_OVERHEAD = 256 * MiB


SLOT_OVERHEAD = 64 * MiB


MIN_CONTEXT = 512


KV_BYTES = {"f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}




# The newest driver branch each bundled CUDA major needs (NVIDIA's CUDA release notes, minor-version
# compatibility): CUDA 13 wheels (vLLM 0.33, torch 2.14) need >= 580, CUDA 12 >= 525.
CUDA_DRIVER_MIN = {"13": "580", "12": "525"}


@dataclass(frozen=True)
class Intent:
    concurrency: int
    context: int  # tokens per request

    def __post_init__(self) -> None:
        """The one check of a load to plan for (the spec, install.sh and `bundler plan` all build one)."""
        from .errors import BundlerError

        for what, v, lo, hi, eg in (("concurrency", self.concurrency, 1, MAX_CONCURRENCY, "--concurrency 32"),
                                    ("context", self.context, 1, MAX_CONTEXT, "--context 4096")):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                unit = "requests served at once" if what == "concurrency" else "tokens per request"
                raise BundlerError(f"{what} {v!r} is outside {lo}..{hi} ({unit})",
                                   hint=f"give a whole number in that range, e.g. {eg}")


MAX_CONCURRENCY = 4096  # requests at once a plan is made for (vLLM's own cap on one replica is 1024 seqs)


MAX_CONTEXT = 1 << 20


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
    memory_per_gpu_gib: tuple[float, ...] = ()
    usable_per_gpu_gib: tuple[float, ...] = ()
    chat_template: str = ""  # built-in llama.cpp template when the GGUF carries none
    tensor_split: tuple[float, ...] = ()  # llama.cpp --tensor-split proportions
    single_gpu: bool = False  # llama.cpp on GPU 0 only (--split-mode none) although the box has more
    max_model_len: int = 0  # vLLM
    max_num_seqs: int = 0  # vLLM, per replica
    api_servers: int = 0  # vLLM front-end processes (0: vLLM's own default, one per data-parallel replica)
    gpu_memory_utilization: float = 0.0  # vLLM
    gpu_split_gib: tuple[float, ...] = ()  # ExLlamaV2 gpu_split
    cpu_variant: str = ""  # llama.cpp on the CPU: the ggml CPU backend that will load (e.g. haswell)
    extra_args: tuple[str, ...] = ()  # engine flags added by --tune (e.g. --kv-unified, --api-server-count 2)
    engine_defaults: bool = False  # the engine as a user starts it by hand (--tune's and --baseline's reference)
    task: str = "chat"  # chat | embed (llama-server --embedding, vLLM --runner pooling)
    pooling: str = ""  # llama.cpp --pooling for an embedding model whose GGUF names none
    reasons: tuple[str, ...] = ()
    rejected: tuple[dict[str, str], ...] = field(default_factory=tuple)
    # what the plan cannot give of what was asked (part of the load at once, one request at a time, a
    # partial offload): printed as warnings and in --json, so a shortfall is never silent
    warnings: tuple[str, ...] = ()
    nodes: int = 1  # servers the one service spans (vLLM's own multi-node: --nnodes)
    pipeline_parallel: int = 1  # vLLM, across servers: each server holds 1/PP of the layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """A plan as to_dict wrote it (plan.json of a release); keys this version does not know are left out."""
        known = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def explain(p: Plan, reasons: bool = True) -> list[str]:
    """The one wording of a plan's why: its warnings (always), its reasons and the engines it rejected."""
    lines = [f"  warning: {w}" for w in p.warnings]
    if reasons:
        lines += [f"  because: {r}" for r in p.reasons]
        lines += [f"  not {r['engine']}: {r['why']}" for r in p.rejected]
    return lines


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def r(n: float) -> float:
    return round(n / GiB, 2)


def ram_needed(info: ModelInfo, slots: int, ctx: int) -> int:
    kv = info.kv_bytes_per_token() * slots * ctx
    return int(info.file_size + kv + BASE_OVERHEAD + SLOT_OVERHEAD * slots)


def gpu_problem(gpus: tuple[Gpu, ...], engine: str, need: float, cuda: str, driver_min: str | None = None) -> str:
    """Why these GPUs cannot run `engine`, which needs compute capability `need` ("" when they can)."""
    if not gpus:
        return "no NVIDIA GPU found (nvidia-smi absent or lists none)"
    low = [g for g in gpus if g.compute_capability and float(g.compute_capability) < need]
    if low:
        return f"{engine} needs compute capability >= {need}; GPU {low[0].index} ({low[0].name}) has " \
               f"{low[0].compute_capability}"
    dmin = driver_min or CUDA_DRIVER_MIN.get(cuda, "0")
    old = [g for g in gpus if g.driver and version_tuple(g.driver) < version_tuple(dmin)]
    if old:
        return f"driver {old[0].driver} is older than {dmin}, which the bundled CUDA {cuda} needs; " \
               f"update the NVIDIA driver to >= {dmin}"
    return ""


def less(hw: Hardware, ram: int, gpu_gib: list[float]) -> Hardware:
    """The box as one model sees it once others have taken RAM and GPU memory."""
    if not ram and not any(gpu_gib):
        return hw
    # both: vLLM sizes by the total, llama.cpp's CUDA plan and ExLlamaV2 by what is free
    gpus = tuple(replace(g, memory_total_mib=int(g.memory_total_mib - gpu_gib[i] * 1024),
                         memory_free_mib=max(0, int(g.memory_free_mib - gpu_gib[i] * 1024)))
                 for i, g in enumerate(hw.gpus))
    return replace(hw, ram_available=max(0, hw.ram_available - ram), gpus=gpus)


EMBED_CONTEXT = 2048  # tokens per embedding input at most: a chunk of a document, not a conversation


EMBED_THREADS_SHARE = 4  # an embedding model on the CPU gets a quarter of the cores: the chat model keeps them all


def tp_candidates(info: ModelInfo, max_gpus: int) -> tuple[list[int], list[str]]:
    """Powers of two up to max_gpus that the model's heads allow, and why the others are not."""
    ok, why = [], []
    tp = 1
    while tp <= max_gpus:
        if info.heads % tp:
            why.append(f"TP {tp}: attention heads ({info.heads}) are not divisible by {tp}")
        elif info.kv_heads % tp and tp % info.kv_heads:
            why.append(f"TP {tp}: KV heads ({info.kv_heads}) neither divide nor are divisible by {tp}")
        else:
            ok.append(tp)
        tp *= 2
    return ok, why


def kv_per_gpu_per_token(info: ModelInfo, tp: int, kv_dtype: str = "f16") -> float:
    heads_per_gpu = max(1, info.kv_heads // tp)
    return info.layers * heads_per_gpu * (info.head_dim_k + info.head_dim_v) * KV_BYTES[kv_dtype]


def refuse_gpu_model(name: str, info: ModelInfo, hw: Hardware, engine: str, usable: float, ctx: int,
                      tps: list[int]) -> PlanRefused:
    tp = max(tps) if tps else 1
    w = info.file_size / tp
    kv_tok = kv_per_gpu_per_token(info, tp)
    need = w + kv_tok * ctx
    short = need - usable
    options = []
    if usable > w:
        fit_ctx = int((usable - w) // kv_tok)
        if fit_ctx >= MIN_CONTEXT:
            options.append(f"a context of {fit_ctx} tokens or less (--context {fit_ctx})")
    gpu_gib = min(g.memory_total_mib for g in hw.gpus) / 1024 if hw.gpus else 80
    for more in (2, 4, 8, 16):
        if more > len(hw.gpus) and info.heads % more == 0 and (info.kv_heads % more == 0 or more % info.kv_heads == 0):
            if info.file_size / more + kv_per_gpu_per_token(info, more) * ctx <= usable:
                options.append(f"{more} GPUs like these (TP {more})")
                break
    for label, factor in (("an FP8 build", 0.5), ("a 4-bit build (AWQ/GPTQ)", 0.28)):
        if info.file_size * factor / tp + kv_tok * ctx <= usable:
            options.append(f"{label} of the model (~{gib(info.file_size * factor)})")
            break
    return PlanRefused(
        f"{name} ({gib(info.file_size)} of weights) does not fit: with TP {tp} each GPU needs {gib(need)} "
        f"for weights and one request of {ctx} tokens, {engine} can use {gib(usable)} of each "
        f"{gpu_gib:.0f} GiB GPU (short by {gib(short)})",
        hint="what would fit: " + ("; ".join(options) if options else "a smaller model"))


def require_gpu_engine(name: str, fmt: str, engine: str, label: str, need: float, engines: tuple[str, ...],
                       hw: Hardware, cuda: str, instead: str) -> None:
    """Refuse unless the bundle carries `engine` and the GPUs can run it."""
    if engine not in engines:
        raise PlanRefused(f"{name} is a {fmt} model but this bundle carries no {label}",
                          hint=f"bundle {label} for it, or {instead}")
    why = gpu_problem(hw.gpus, engine, need, cuda)
    if why:
        raise PlanRefused(f"{name} ({fmt}) needs {label} on NVIDIA GPUs: {why}",
                          hint=f"use a GPU box that qualifies, or bundle {instead}")

