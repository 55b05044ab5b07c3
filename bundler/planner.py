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

Memory model (estimates, each constant with where it comes from):
- weights: the model's file size (GGUF) or safetensors bytes; llama.cpp keeps
  the output/embedding tensors as about one more layer's worth.
- KV cache per token: Σ layers × kv_heads × (head_dim_k + head_dim_v) × bytes
  per element (f16 2, q8_0 1.0625 = 34 bytes per 32 values, q4_0 0.5625 = 18 per
  32; ggml block sizes). Sliding-window layers are counted as full: an upper bound.
  With tensor parallel each GPU holds kv_heads / TP heads (at least one).
- llama.cpp on a GPU: 95 % of free memory, less 600 MiB for the CUDA context and
  compute buffers (llama-server logs ~300-500 MiB of CUDA compute buffer for a
  512-token ubatch on 8B models).
- llama.cpp on the CPU: 85 % of available RAM; 256 MiB + 64 MiB per slot of
  compute buffers.
- vLLM: --gpu-memory-utilization 0.90 of total memory (vLLM's default), of which
  2 GiB go to activations, CUDA graphs and NCCL buffers (vLLM's profile run
  reports 1-3 GiB of non-KV, non-weight memory for 8B-70B models).
- ExLlamaV2/V3: 95 % of free memory less 1 GiB per GPU for activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import PlanRefused
from .modelinfo import ModelInfo, fallback_template
from .probe import Gpu, Hardware
from .versions import version_tuple  # noqa: F401 - planner.version_tuple, as before

GiB = 1 << 30
MiB = 1 << 20
RAM_FRACTION = 0.85
BASE_OVERHEAD = 256 * MiB
SLOT_OVERHEAD = 64 * MiB
MIN_CONTEXT = 512
# llama.cpp on the CPU batches only until the cores are busy: on 2 cores, 4 slots served 50
# concurrent requests at 74.2 tok/s and 50 slots at 67.3 (gemma 3 270M, docs/BENCHMARKS.md), so
# the slots stop at 2 per core (4 at least, llama-server's own default) and further requests
# wait in llama-server's queue. Beyond 2 cores this is untested; --tune tries twice the slots.
CPU_SLOTS_PER_CORE = 2
CPU_MIN_SLOTS = 4
LLAMA_GPU_FRACTION = 0.95
LLAMA_GPU_OVERHEAD = 600 * MiB
VLLM_UTILIZATION = 0.90
VLLM_OVERHEAD = 2 * GiB
# The widest tensor parallel the planner picks over NVLink when a smaller one would fit: TP 4 was
# measured faster than data parallel on 4×H200; wider TP is untested, so 8 GPUs get TP 4 × DP 2.
NVLINK_TP_MAX = 4
# Over NVLink, TP is widened only while the target load is at most this many requests per GPU;
# above it, data-parallel replicas of the smallest fitting TP serve more. Every vLLM measurement
# so far agrees (docs/BENCHMARKS.md, 400-token prompts, 512 output tokens): 4×H200, 8B and 70B at
# 50 and 200 (12.5 and 50 per GPU): TP 4 won; 2×H200, a 7B with 4 KV heads at 50 (25 per GPU):
# TP 2 11,147 tok/s against DP 2 9,360; at 200 (100 per GPU): DP 2 20,520 against TP 2 11,819.
# The crossover lies between 50 and 100 requests per GPU for 7-8B models on H200.
TP_WIDEN_MAX_PER_GPU = 50
# vLLM's one API server process (tokenizing, detokenizing, streaming) capped one H200 at about
# 11,000 output tok/s with 200 streams of a 7B: two served 17,028 (again 17,140), four 17,180, with
# equal figures at 1 and 50 (docs/BENCHMARKS.md, --tune). A second one is planned wherever the box
# has the cores for it; data-parallel replicas already get one each from `vllm serve`.
API_SERVERS = 2
API_SERVER_MIN_CPUS = 8
EXL2_OVERHEAD = 1 * GiB
KV_BYTES = {"f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}
MIN_CC = {"llama.cpp": 5.0, "vllm": 7.0, "exllamav2": 7.0, "exllamav3": 8.0}
# The compute capability vLLM's kernels need per quantization (vLLM's "supported hardware" table):
# AWQ from Turing, GPTQ and bitsandbytes from Volta, FP8 from Ampere (weight-only Marlin; W8A8 from
# Ada), Marlin kernels and compressed-tensors' W4A16 from Ampere.
VLLM_QUANT_MIN_CC = {"awq": 7.5, "awq_marlin": 8.0, "gptq": 7.0, "gptq_marlin": 8.0, "marlin": 8.0,
                     "bitsandbytes": 7.0, "fp8": 8.0, "compressed-tensors": 8.0, "modelopt": 8.9, "mxfp4": 8.0}
# The newest driver branch each bundled CUDA major needs (NVIDIA's CUDA release notes, minor-version
# compatibility): CUDA 13 wheels (vLLM 0.33, torch 2.14) need >= 580, CUDA 12 >= 525.
CUDA_DRIVER_MIN = {"13": "580", "12": "525"}
ALL_ENGINES = ("cpu", "cuda", "vllm", "exllamav2", "exllamav3")


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


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _r(n: float) -> float:
    return round(n / GiB, 2)


def vllm_default_max_num_seqs(gpu: Gpu) -> int:
    """vLLM's own --max-num-seqs for its OpenAI server on this GPU (vllm/engine/arg_utils.py,
    get_batch_defaults, 0.26): 1024 where the GPU has >= 70 GiB and is not an A100, else 256."""
    return 1024 if gpu.memory_total_mib * MiB >= 70 * GiB and "a100" not in gpu.name.lower() else 256


def vllm_max_num_seqs(gpu: Gpu, per_replica: int) -> tuple[int, str]:
    """--max-num-seqs for a replica that should serve `per_replica` requests at once, and why.
    Never below vLLM's own default: the target load sizes the plan, it is not a throttle. vLLM
    captures CUDA graphs for batches up to min(2 × max-num-seqs, 512), so a cap at the target
    (it was once) leaves the target batch itself outside the graphs (4,849 against 8,798 tok/s for
    50 requests on one H200) and queues every request past it while KV memory sits unused."""
    default = vllm_default_max_num_seqs(gpu)
    seqs = max(default, per_replica)
    why = (f"--max-num-seqs {seqs}: vLLM's own default for a {gpu.memory_total_mib // 1024} GiB "
           f"{gpu.name or 'GPU'} is {default}" + (", kept: the target load" if seqs == default else
                                                   ", raised to the target load") +
           f" ({per_replica} per replica) is planned for, not capped at; CUDA graphs cover batches up to "
           f"{min(2 * seqs, 512)}")
    if per_replica > 512:
        why += " (batches above 512 run without graphs: more replicas or GPUs keep them inside)"
    return seqs, why


def vllm_api_servers(hw: Hardware, data_parallel: int) -> int:
    """--api-server-count for a plan: API_SERVERS for one replica on a box with the cores for it,
    else 0 (vLLM's own: one per replica)."""
    return API_SERVERS if data_parallel == 1 and hw.cpus >= API_SERVER_MIN_CPUS else 0


def ram_needed(info: ModelInfo, slots: int, ctx: int) -> int:
    kv = info.kv_bytes_per_token() * slots * ctx
    return int(info.file_size + kv + BASE_OVERHEAD + SLOT_OVERHEAD * slots)


def _gpu_problem(gpus: tuple[Gpu, ...], engine: str, cuda: str, driver_min: str | None = None) -> str:
    """Why these GPUs cannot run `engine` ("" when they can)."""
    if not gpus:
        return "no NVIDIA GPU found (nvidia-smi absent or lists none)"
    need = MIN_CC[engine]
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


def plan(model_name: str, info: ModelInfo, hw: Hardware, intent: Intent,
         engines_available: tuple[str, ...] = ("cpu",), cpu_flags_needed: tuple[str, ...] = (),
         cuda: str = "13", cpu_variants: tuple[str, ...] = (), cuda_cpu_flags: tuple[str, ...] = (),
         task: str = "chat", vllm_utilization: float = VLLM_UTILIZATION) -> Plan:
    """Choose the engine and its parameters for serving `info` on `hw` at `intent`. `cpu_variants`:
    the CPU backends the bundled llama-server carries (ggml loads the best this CPU runs)."""
    if task == "embed":
        return _plan_embed(model_name, info, hw, intent, engines_available, cpu_flags_needed, cuda, cpu_variants,
                           cuda_cpu_flags)
    if info.format == "safetensors":
        return _plan_vllm(model_name, info, hw, intent, engines_available, cuda, vllm_utilization)
    if info.format == "gguf":
        p = _plan_gguf(model_name, info, hw, intent, engines_available, cpu_flags_needed, cuda, cuda_cpu_flags)
        return _with_cpu_variant(p, hw, cpu_variants) if p.backend == "cpu" else p
    if info.format in ("exl2", "exl3"):
        return _plan_exl(model_name, info, hw, intent, engines_available, cuda)
    from .engines import for_format  # an engine of its own package plans the formats above leave

    engine = for_format(info.format)
    if engine is not None and engine.plan is not None:
        if engine.name not in engines_available:
            raise PlanRefused(f"{model_name}: {info.format} is served by {engine.label}, which this bundle does not "
                              "carry", hint=f"bundle it with a {info.format} model in the spec")
        return engine.plan(model_name, info, hw, intent, task)
    raise PlanRefused(f"{model_name}: unknown format {info.format!r}", hint="use GGUF, safetensors, EXL2 or EXL3")


# ---- several models in one bundle: a chat model and its companions ---------------

def plan_models(models: list[tuple[str, ModelInfo, str]], hw: Hardware, intent: Intent, **engines: Any) -> list[Plan]:
    """Plans for every model of a bundle, (name, facts, task) each, the first the main (chat) model.
    The others (an embedding model, say) are planned first, small; the main model gets what they
    leave: RAM, GPU memory and, for vLLM, the share of --gpu-memory-utilization; and says so."""
    extra: list[Plan] = []
    ram = 0
    gpu = [0.0] * len(hw.gpus)
    for name, info, task in models[1:]:
        p = plan(name, info, _less(hw, ram, gpu), intent, task=task, **engines)
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
    util = round(VLLM_UTILIZATION - math.ceil(worst * 100) / 100, 2)
    if util < 0.3 and any(p.backend == "cuda" for p in extra):
        raise PlanRefused(f"the bundle's other models ({', '.join(p.model for p in extra)}) would take "
                          f"{worst:.0%} of a GPU's memory, leaving {name} too little",
                          hint="serve the embedding model on the CPU (a GGUF build), or use a GPU with more memory")
    main = plan(name, info, _less(hw, ram, gpu if info.format != "safetensors" else [0.0] * len(gpu)), intent,
                task=task, vllm_utilization=util, **engines)
    took = "; ".join(f"{p.model} ({p.task}, {p.engine} {p.backend}: " +
                     (f"{_gib(sum(p.memory_per_gpu_gib) * GiB)} GPU memory)" if p.backend == "cuda"
                      else f"{_gib(p.ram_bytes)} RAM, {p.threads} thread(s))") for p in extra)
    main = replace(main, reasons=(*main.reasons, f"planned with what the bundle's other models leave: {took}"))
    return [main, *extra]


def _less(hw: Hardware, ram: int, gpu_gib: list[float]) -> Hardware:
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


def _plan_embed(name: str, info: ModelInfo, hw: Hardware, intent: Intent, engines: tuple[str, ...],
                cpu_flags_needed: tuple[str, ...], cuda: str, cpu_variants: tuple[str, ...],
                cuda_cpu_flags: tuple[str, ...]) -> Plan:
    """An embedding model: one forward pass per input, no generation. GGUF: llama-server
    --embedding; safetensors: vLLM's pooling runner on one GPU, with a small memory share."""
    ctx = min(intent.context, info.context_length or intent.context, EMBED_CONTEXT)
    why = (f"embedding model: inputs of up to {ctx} tokens (the model's trained context, at most {EMBED_CONTEXT}: "
           "a chunk of a document), one forward pass each")
    if info.format == "safetensors":
        _require_gpu_engine(name, "safetensors", "vllm", "vLLM", engines, hw, cuda,
                            "a GGUF build of the model to serve it with llama.cpp on the CPU")
        gpu = min(hw.gpus, key=lambda g: g.memory_total_mib)
        seqs = min(max(intent.concurrency, 8), 256)
        need = info.file_size + VLLM_OVERHEAD + kv_per_gpu_per_token(info, 1) * ctx * min(seqs, 16)
        util = min(VLLM_UTILIZATION, math.ceil(need / (gpu.memory_total_mib * MiB) * 100) / 100)
        return Plan(engine="vllm", backend="cuda", model=name, threads=max(1, hw.cpus), slots=seqs,
                    context_per_slot=ctx, gpu_layers=info.layers, total_layers=info.layers,
                    memory_per_gpu_gib=(_r(need),), usable_per_gpu_gib=(_r(util * gpu.memory_total_mib * MiB),),
                    max_model_len=ctx, max_num_seqs=seqs, gpu_memory_utilization=util, task="embed",
                    reasons=(why, f"vLLM's pooling runner on GPU {gpu.index}, tensor parallel 1: "
                                  f"--gpu-memory-utilization {util:g} holds its weights ({_gib(info.file_size)}), "
                                  f"vLLM's overhead and {min(seqs, 16)} inputs at once; the rest is the chat model's"),
                    rejected=({"engine": "llama.cpp", "why": "serves GGUF only"},))
    if info.format != "gguf":
        raise PlanRefused(f"{name}: an embedding model must be GGUF or safetensors, not {info.format}",
                          hint="bundle a GGUF or safetensors build of it")
    p = _plan_gguf(name, info, hw, Intent(intent.concurrency, ctx), engines, cpu_flags_needed, cuda, cuda_cpu_flags)
    if p.backend == "cpu":
        p = _with_cpu_variant(p, hw, cpu_variants)
    threads = max(1, hw.cpus // EMBED_THREADS_SHARE) if p.backend == "cpu" else p.threads
    pooling = "" if info.pooling else "mean"
    reasons = [why, *(r for r in p.reasons if "chat template" not in r)]
    if p.backend == "cpu":
        reasons.append(f"{threads} thread(s) of {hw.cpus}: the chat model keeps every core, embeddings are short")
    reasons.append(f"pooling {info.pooling} (the GGUF's own)" if info.pooling else
                   "mean pooling: the GGUF names none (a language model used for embeddings)")
    return replace(p, threads=threads, task="embed", pooling=pooling, chat_template="", reasons=tuple(reasons))


# ---- GGUF: llama.cpp ----------------------------------------------------------

def _with_cpu_variant(p: Plan, hw: Hardware, variants: tuple[str, ...]) -> Plan:
    from .engines.llama_cpp import CPU_VARIANTS, best_cpu_variant

    if not variants:
        return p
    if not hw.cpu_flags:  # not seen (no /proc/cpuinfo): the level that runs on any x86-64
        v = "x64" if "x64" in variants else variants[0]
        return replace(p, cpu_variant=v, reasons=(*p.reasons, f"CPU backend {v}: this CPU's instruction sets "
                                                  "were not seen, so the baseline build"))
    v = best_cpu_variant(hw.cpu_flags, variants)
    if not v:
        raise PlanRefused(f"none of the bundled CPU backends ({', '.join(variants)}) runs on this CPU "
                          f"(flags: {' '.join(hw.cpu_flags) or 'none seen'})",
                          hint="bundle a llama-server built with GGML_CPU_ALL_VARIANTS for this architecture")
    need = CPU_VARIANTS.get(v, ())
    sets = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8") if f in need]
    why = (f"CPU backend {v} ({'/'.join(x.upper() for x in sets) or 'baseline x86-64'}): the best of the "
           f"{len(variants)} instruction-set levels bundled (llama-server-{v}) for this CPU")
    return replace(p, cpu_variant=v, reasons=(*p.reasons, why))


def _template_reason(info: ModelInfo) -> tuple[str, str]:
    template = fallback_template(info)
    if template:
        return template, (f"the GGUF carries no chat template: using llama.cpp's built-in {template!r} "
                          f"for architecture {info.architecture}")
    if not info.has_chat_template:
        return "", f"the GGUF carries no chat template and none is known for {info.architecture}: chatml is used"
    return "", ""


def _plan_gguf(name: str, info: ModelInfo, hw: Hardware, intent: Intent, engines: tuple[str, ...],
               cpu_flags_needed: tuple[str, ...], cuda: str, cuda_cpu_flags: tuple[str, ...] = ()) -> Plan:
    rejected: list[dict[str, str]] = [
        {"engine": "vllm", "why": "vLLM serves no GGUF (removed in 0.33); this model is GGUF"},
        {"engine": "exllamav2/exllamav3", "why": "ExLlama serves EXL2/EXL3 only"},
    ]
    ctx = intent.context
    notes: list[str] = []
    if info.context_length and ctx > info.context_length:
        notes.append(f"context per request {ctx} capped at the model's trained context {info.context_length}")
        ctx = info.context_length
    gpu_why = _gpu_problem(hw.gpus, "llama.cpp", cuda)
    if "cuda" not in engines and hw.gpus:
        gpu_why = (f"the box has {len(hw.gpus)} GPU(s) but this bundle carries only a CPU llama-server; "
                   "bundle with backends = [\"cpu\", \"cuda\"] to use them")
    lacking = [f for f in cuda_cpu_flags if hw.cpu_flags and f not in hw.cpu_flags]
    if not gpu_why and lacking:
        gpu_why = (f"the CUDA llama-server's CPU side is built for AVX2/FMA (x86-64-v3); this CPU lacks "
                   f"{', '.join(lacking)}")
    if not gpu_why:
        p = _plan_llama_gpu(name, info, hw, intent.concurrency, ctx, notes, rejected)
        if p is not None and cuda_cpu_flags:
            p = replace(p, reasons=(*p.reasons, "the CUDA build's CPU side (sampling, and any layers left on the CPU) "
                                                "runs AVX2/FMA code (x86-64-v3), which this CPU has"))
        if p is not None:
            return p
    else:
        rejected.append({"engine": "llama.cpp (cuda)", "why": gpu_why})
    if "cpu" not in engines:
        why = "; ".join(r["why"] for r in rejected) or "no llama.cpp build"
        raise PlanRefused(f"{name}: GGUF is served by llama.cpp, and this bundle carries no llama.cpp build that can "
                          f"serve it here ({why})",
                          hint='bundle it with [engines.llama_cpp] backends = ["cpu"] (and/or "cuda")')
    return _plan_llama_cpu(name, info, hw, intent.concurrency, ctx, notes, rejected, cpu_flags_needed)


def _plan_llama_cpu(name: str, info: ModelInfo, hw: Hardware, slots: int, ctx: int, notes: list[str],
                    rejected: list[dict[str, str]], cpu_flags_needed: tuple[str, ...]) -> Plan:
    want_slots, want_ctx = slots, ctx
    missing_flags = [f for f in cpu_flags_needed if hw.cpu_flags and f not in hw.cpu_flags]
    if missing_flags:
        raise PlanRefused(f"this CPU lacks {', '.join(missing_flags)}, which the bundled llama-server needs",
                          hint="bundle on a machine like this box, or use a box with an x86-64-v3 CPU")
    threads = max(1, hw.cpus)
    reasons = [f"llama.cpp on the CPU: GGUF model, no usable GPU engine; {threads} threads = CPU cores "
               "available to this process", *notes]
    cap = max(CPU_MIN_SLOTS, CPU_SLOTS_PER_CORE * threads)
    if slots > cap:
        reasons.append(f"{cap} slots for a target of {slots} concurrent requests: a CPU batches only until its "
                       f"cores are busy (on 2 cores 4 slots served 50 requests 1.10x faster than 50 slots); the "
                       f"other requests wait in llama-server's queue")
        slots = cap
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
                    f"{name} does not fit in RAM: needs {_gib(ram_needed(info, 1, MIN_CONTEXT))} for one "
                    f"request of {MIN_CONTEXT} tokens, usable RAM is {_gib(budget)} (short by {_gib(short)})",
                    hint="free memory, add RAM, bundle a smaller quantization (e.g. Q4_K_M is ~30 % of F16), "
                         "or use GPUs with a CUDA build")
            reasons.append(f"slots lowered from {slots} to {fit_slots} at {MIN_CONTEXT} tokens each to fit "
                           f"usable RAM {_gib(budget)}")
            slots, ctx = fit_slots, MIN_CONTEXT
    else:
        reasons.append(f"{slots} slots × {ctx} tokens each")
    need = ram_needed(info, slots, ctx)
    reasons.append(f"memory estimate {_gib(need)} = weights {_gib(info.file_size)} + KV cache "
                   f"{_gib(kv_tok * slots * ctx)} ({kv_tok / 1024:.1f} KiB/token) + buffers; "
                   f"usable RAM {_gib(budget)} of {_gib(hw.ram_available)} available")
    template, why = _template_reason(info)
    if why:
        reasons.append(why)
    warns = []
    if slots < want_slots:
        warns.append(f"{slots} of the {want_slots} target requests are served at once (RAM); the rest queue")
    if ctx < want_ctx:
        warns.append(f"context per request cut to {ctx} tokens from {want_ctx} to fit RAM")
    return Plan(engine="llama.cpp", backend="cpu", model=name, threads=threads, slots=slots, context_per_slot=ctx,
                gpu_layers=0, total_layers=info.layers, ram_bytes=need, chat_template=template,
                reasons=tuple(reasons), rejected=tuple(rejected), warnings=tuple(warns))


def _plan_llama_gpu(name: str, info: ModelInfo, hw: Hardware, slots: int, ctx: int, notes: list[str],
                    rejected: list[dict[str, str]]) -> Plan | None:
    gpus = hw.gpus
    usable = [max(0, int(g.memory_free_mib * MiB * LLAMA_GPU_FRACTION) - LLAMA_GPU_OVERHEAD) for g in gpus]
    total_usable = sum(usable)
    L = max(1, info.layers)
    per_layer = info.file_size / (L + 1)  # + output/embeddings ≈ one more layer
    kv_layer_tok = info.kv_bytes_per_token() / L
    tokens = slots * ctx
    reasons = [*notes]
    need_all = info.file_size + kv_layer_tok * L * tokens
    template, twhy = _template_reason(info)
    if len(gpus) > 1 and need_all <= usable[0]:
        # llama.cpp's layer split runs the GPUs one after another: a model that fits one GPU
        # gains nothing from more, and pays for the hops between them.
        reasons.append(f"one GPU is enough (needs {_gib(need_all)} of {_gib(usable[0])}): llama.cpp gains nothing "
                       f"from splitting it over {len(gpus)} (--split-mode none); the other GPUs stay free. For "
                       "throughput over several GPUs, serve a safetensors build with vLLM (data parallel)")
        gpus, usable, total_usable = gpus[:1], usable[:1], usable[0]
    if need_all <= total_usable:
        ngl = L
        reasons.insert(0, f"llama.cpp with every layer on {len(gpus)} GPU(s): weights {_gib(info.file_size)} + "
                          f"KV for {slots} slots × {ctx} tokens {_gib(kv_layer_tok * L * tokens)} fit "
                          f"{_gib(total_usable)} usable GPU memory")
        on_gpu = need_all
        cpu_bytes = 0.0
    else:
        ngl = int((total_usable - per_layer) // (per_layer + kv_layer_tok * tokens))
        ngl = max(0, min(ngl, L - 1))
        if ngl == 0:
            rejected.append({"engine": "llama.cpp (cuda)",
                             "why": f"not one layer with its KV fits {_gib(total_usable)} usable GPU memory"})
            return None
        on_gpu = per_layer + ngl * (per_layer + kv_layer_tok * tokens)
        cpu_bytes = (L - ngl) * (per_layer + kv_layer_tok * tokens)
        if cpu_bytes + BASE_OVERHEAD > hw.ram_available * RAM_FRACTION:
            rejected.append({"engine": "llama.cpp (cuda, partial offload)",
                             "why": f"the {L - ngl} layers left for the CPU need {_gib(cpu_bytes)}, more than "
                                    f"usable RAM {_gib(hw.ram_available * RAM_FRACTION)}"})
            return None
        reasons.insert(0, f"llama.cpp with partial offload: {ngl} of {L} layers on {len(gpus)} GPU(s), the rest on "
                          f"{hw.cpus} CPU threads: everything needs {_gib(need_all)}, the GPUs have "
                          f"{_gib(total_usable)} usable (short by {_gib(need_all - total_usable)}; a smaller "
                          "quant or more GPU memory keeps every layer on the GPU, which is much faster)")
    split = tuple(round(u / total_usable, 3) for u in usable) if len(gpus) > 1 else ()
    single = len(gpus) == 1 and len(hw.gpus) > 1
    per_gpu = [on_gpu * u / total_usable + LLAMA_GPU_OVERHEAD for u in usable]
    reasons.append(f"{slots} slots (target concurrency) × {ctx} tokens each (--parallel {slots}, "
                   f"--ctx-size {slots * ctx})")
    if len(gpus) > 1:
        links = hw.gpu_links or "unknown links"
        reasons.append(f"{len(gpus)} GPUs split by layer (--split-mode layer, --tensor-split "
                       f"{','.join(str(s) for s in split)} by free memory): the least traffic between GPUs "
                       f"({links}). Row split (-sm row) can lower single-request latency on NVLink but "
                       "rarely raises throughput; for many users on several GPUs, vLLM with the safetensors "
                       "model and tensor parallel is faster")
    reasons.append(f"memory estimate per GPU {', '.join(_gib(b) for b in per_gpu)} "
                   f"(usable {', '.join(_gib(u + LLAMA_GPU_OVERHEAD) for u in usable)})")
    if twhy:
        reasons.append(twhy)
    return Plan(engine="llama.cpp", backend="cuda", model=name, threads=max(1, hw.cpus), slots=slots,
                context_per_slot=ctx, gpu_layers=ngl, total_layers=L, ram_bytes=int(cpu_bytes + BASE_OVERHEAD),
                memory_per_gpu_gib=tuple(_r(b) for b in per_gpu),
                usable_per_gpu_gib=tuple(_r(u + LLAMA_GPU_OVERHEAD) for u in usable),
                chat_template=template, tensor_split=split, single_gpu=single, reasons=tuple(reasons),
                rejected=tuple(rejected),
                warnings=(f"partial offload: {ngl} of {L} layers on the GPU, the rest on the CPU (much slower)",)
                if ngl < L else ())


# ---- safetensors: vLLM ----------------------------------------------------------

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


def _refuse_gpu_model(name: str, info: ModelInfo, hw: Hardware, engine: str, usable: float, ctx: int,
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
            options.append(f"{label} of the model (~{_gib(info.file_size * factor)})")
            break
    return PlanRefused(
        f"{name} ({_gib(info.file_size)} of weights) does not fit: with TP {tp} each GPU needs {_gib(need)} "
        f"for weights and one request of {ctx} tokens, {engine} can use {_gib(usable)} of each "
        f"{gpu_gib:.0f} GiB GPU (short by {_gib(short)})",
        hint="what would fit: " + ("; ".join(options) if options else "a smaller model"))


def _require_gpu_engine(name: str, fmt: str, engine: str, label: str, engines: tuple[str, ...], hw: Hardware,
                        cuda: str, instead: str) -> None:
    """Refuse unless the bundle carries `engine` and the GPUs can run it."""
    if engine not in engines:
        raise PlanRefused(f"{name} is a {fmt} model but this bundle carries no {label}",
                          hint=f"bundle {label} for it, or {instead}")
    why = _gpu_problem(hw.gpus, engine, cuda)
    if why:
        raise PlanRefused(f"{name} ({fmt}) needs {label} on NVIDIA GPUs: {why}",
                          hint=f"use a GPU box that qualifies, or bundle {instead}")


def _plan_vllm(name: str, info: ModelInfo, hw: Hardware, intent: Intent, engines: tuple[str, ...],
               cuda: str, utilization: float = VLLM_UTILIZATION) -> Plan:
    rejected = [{"engine": "llama.cpp", "why": "serves GGUF only; convert the model to GGUF to use it"},
                {"engine": "exllamav2/exllamav3", "why": "serve EXL2/EXL3 only"}]
    _require_gpu_engine(name, "safetensors", "vllm", "vLLM", engines, hw, cuda,
                        "a GGUF build of the model to serve it with llama.cpp on the CPU")
    n = len(hw.gpus)
    ctx = intent.context
    reasons: list[str] = []
    if info.quantization:
        q = info.quantization
        need = VLLM_QUANT_MIN_CC.get(q)
        label = f"{q.upper()}" + (f" {info.bits:g}-bit" if info.bits else "") + \
            (f", group size {info.group_size}" if info.group_size else "")
        if need is None:
            reasons.append(f"quantization {label}: not one the planner knows; vLLM decides at start whether this "
                           "GPU runs it")
        else:
            low = [g for g in hw.gpus if g.compute_capability and float(g.compute_capability) < need]
            if low:
                raise PlanRefused(f"{name} is {label} quantized; vLLM's {q} kernels need compute capability >= {need}, "
                                  f"GPU {low[0].index} ({low[0].name}) has {low[0].compute_capability}",
                                  hint="a build of the model in another quantization (GPTQ runs from 7.0, a GGUF "
                                       "with llama.cpp from 5.0), or newer GPUs")
            reasons.append(f"quantization {label}: {_gib(info.file_size)} of weights as stored; vLLM's kernels for it "
                           f"need compute capability >= {need}, these GPUs have {hw.gpus[0].compute_capability}")
    if info.context_length and ctx > info.context_length:
        reasons.append(f"context per request {ctx} capped at the model's trained context {info.context_length}")
        ctx = info.context_length
    gpu_bytes = min(g.memory_total_mib for g in hw.gpus) * MiB
    usable = gpu_bytes * utilization - VLLM_OVERHEAD
    tps, not_ok = tp_candidates(info, n)
    conc = intent.concurrency

    def replicas(tp: int) -> tuple[int, int, int]:
        """(replicas, requests each, requests of ctx tokens one replica's KV holds) for this TP size."""
        dp_ = max(1, min(n // tp, conc))
        w_ = info.file_size / tp
        full_ = int((usable - w_) // (kv_per_gpu_per_token(info, tp) * ctx)) if usable > w_ else 0
        return dp_, math.ceil(conc / dp_), full_

    # The smallest TP whose replica holds its share of the load at full context; if none does, the
    # TP that holds the most requests at once.
    layouts = {tp: replicas(tp) for tp in tps}
    fitting = next((tp for tp, (_, share, full) in layouts.items() if full >= share), None)
    held = {tp: min(full, share) * dp_ for tp, (dp_, share, full) in layouts.items() if full >= 1}
    if fitting is None and not held:
        raise _refuse_gpu_model(name, info, hw, "vLLM", usable, ctx, tps)
    tp = fitting if fitting is not None else max(held, key=lambda t: (held[t], -t))
    head = (f"vLLM: safetensors on {n} GPU(s) with compute capability {hw.gpus[0].compute_capability}; "
            f"tensor parallel {tp}")
    if fitting is None:
        head += f": weights {_gib(info.file_size / tp)} per GPU, {_gib(usable)} usable"
        reasons.append(f"KV for {conc} requests of {ctx} tokens does not fit any TP size; TP {tp} holds the "
                       f"most: {held[tp]} at full length at once (paged KV packs more when requests are shorter; "
                       "vLLM queues the rest; more GPUs or a shorter context serve more)")
    else:
        smaller = [t for t in tps if t < tp]
        head += (f" is the smallest size whose share of weights ({_gib(info.file_size / tp)}) and KV for "
                 f"{layouts[tp][1]} requests × {ctx} tokens per replica fits {_gib(usable)} per GPU"
                 + (f" (TP {', '.join(map(str, smaller))} does not)" if smaller else ""))
        # Over NVLink a wider TP splits each token's weight reads over more GPUs for little all-reduce
        # cost, and beat data-parallel replicas at every load measured (docs/BENCHMARKS.md, 4×H200).
        # At high load per GPU, replicas win instead (TP_WIDEN_MAX_PER_GPU).
        wider = [t for t in tps if tp < t <= min(n, NVLINK_TP_MAX)]
        per_gpu = conc / n
        if hw.gpu_links == "nvlink" and wider and per_gpu <= TP_WIDEN_MAX_PER_GPU:
            head += (f"; widened to TP {max(wider)} over NVLink: the target load is {per_gpu:g} requests per GPU "
                     f"(<= {TP_WIDEN_MAX_PER_GPU}), where wider TP measured faster: on 4×H200, TP 4 served "
                     f"Llama-8B at 11,001 tok/s with 50 concurrent requests against 8,618 for 4 data-parallel "
                     f"replicas, and 70B at 2,659 against 1,918 for TP 2 × DP 2; on 2×H200 a 7B with 4 KV heads "
                     f"at 50 requests, TP 2 11,147 against DP 2 9,360")
            tp = max(wider)
        elif hw.gpu_links == "nvlink" and wider:
            head += (f"; not widened over NVLink: the target load is {per_gpu:g} requests per GPU (> "
                     f"{TP_WIDEN_MAX_PER_GPU}), where data-parallel replicas measured faster: on 2×H200 a 7B with "
                     f"4 KV heads at 200 requests, DP 2 served 20,520 tok/s against 11,819 for TP 2")
    reasons.insert(0, head)
    dp, per_replica, full_fit = replicas(tp)
    # vLLM batches up to seqs; its paged KV decides how many fit at once
    seqs, seqs_why = vllm_max_num_seqs(min(hw.gpus, key=lambda g: g.memory_total_mib), per_replica)
    w = info.file_size / tp
    est = w + kv_per_gpu_per_token(info, tp) * min(per_replica, full_fit) * ctx + VLLM_OVERHEAD
    if dp > 1:
        reasons.append(f"data parallel {dp}: {n - tp} GPU(s) left over hold {dp - 1} more replica(s), each "
                       f"serving ~{per_replica} of the {conc} concurrent requests; replicas need no traffic between "
                       "them")
    elif n > tp:
        reasons.append(f"{n - tp} GPU(s) left idle: the target concurrency ({conc}) needs no second replica"
                       if conc < n // tp else f"{n - tp} GPU(s) left idle: no TP size uses exactly {n} GPUs")
    if tp > 1:
        reasons.append("tensor parallel over NVLink" if hw.gpu_links == "nvlink" else
                       f"tensor parallel over {hw.gpu_links or 'unknown links'}: slower than NVLink; more "
                       "replicas (data parallel) may serve better")
    reasons += [f"not TP {w_}" for w_ in not_ok]
    reasons.append(seqs_why)
    api = vllm_api_servers(hw, dp)
    if api:
        reasons.append(f"--api-server-count {api}: one front-end process capped one H200 at ~11,000 tok/s with 200 "
                       f"streams of a 7B, two served 17,028 (four no more); {hw.cpus} cores leave room for it")
    elif dp > 1:
        reasons.append(f"{dp} API servers, one per replica (vllm serve's own default)")
    share = "(vLLM's default)" if utilization == VLLM_UTILIZATION else \
        f"(vLLM's default {VLLM_UTILIZATION} less what the bundle's other models take)"
    reasons.append(f"--max-model-len {ctx} (tokens per request), --gpu-memory-utilization {utilization:g} {share}; "
                   f"estimate {_gib(est)} per GPU for the target load of {conc}, of "
                   f"{_gib(gpu_bytes * utilization)} allowed (the rest is KV cache for more)")
    used = tp * dp
    return Plan(engine="vllm", backend="cuda", model=name, threads=max(1, hw.cpus), slots=conc,
                context_per_slot=ctx, gpu_layers=info.layers, total_layers=info.layers, tensor_parallel=tp,
                data_parallel=dp, memory_per_gpu_gib=tuple(_r(est) for _ in range(used)),
                usable_per_gpu_gib=tuple(_r(gpu_bytes * utilization) for _ in range(used)),
                max_model_len=ctx, max_num_seqs=seqs, gpu_memory_utilization=utilization, api_servers=api,
                reasons=tuple(reasons), rejected=tuple(rejected),
                warnings=(f"{min(per_replica, full_fit) * dp} of the {conc} target requests fit at full length "
                          f"({ctx} tokens) at once; the rest queue (shorter requests pack more)",)
                if min(per_replica, full_fit) * dp < conc else ())


# ---- EXL2 / EXL3: ExLlamaV2 / ExLlamaV3 ------------------------------------------

def _plan_exl(name: str, info: ModelInfo, hw: Hardware, intent: Intent, engines: tuple[str, ...],
              cuda: str) -> Plan:
    gen = info.format[-1]  # "2" | "3": the quant_method in the model's config names the generation
    engine, label, fmt = f"exllamav{gen}", f"ExLlamaV{gen}", info.format.upper()
    rejected = [{"engine": "llama.cpp", "why": "serves GGUF only"},
                {"engine": "vllm", "why": f"serves no {fmt} quantization"},
                {"engine": f"exllamav{5 - int(gen)}", "why": f"ExLlamaV{5 - int(gen)} does not load {fmt}"}]
    _require_gpu_engine(name, fmt, engine, label, engines, hw, cuda, "a GGUF build for llama.cpp")
    ctx = min(intent.context, info.context_length or intent.context)
    conc = intent.concurrency
    batch_note = ""
    if gen == "2" and "flash-attn" not in engines and conc > 1:
        # exllamav2's paged (batching) generator needs flash-attn, which has no wheel to carry: TabbyAPI
        # refused to load on cc >= 8 without it (../shared/EXLLAMA.md); unpaged, one request at a time
        batch_note = (f"ExLlamaV2 serves ONE request at a time here: batching needs flash-attn (paged attention), "
                      f"which this bundle does not carry; the other {conc - 1} of the {conc} concurrent requests "
                      "wait. For that load, rather: an EXL3 build (ExLlamaV3 batches with its Triton kernels), "
                      "an AWQ/GPTQ safetensors build with vLLM, or a GGUF with llama.cpp (both batch)")
        conc = 1
    usable = [max(0, g.memory_free_mib * MiB * LLAMA_GPU_FRACTION - EXL2_OVERHEAD) for g in hw.gpus]
    kv = info.kv_bytes_per_token() * conc * ctx
    need = info.file_size + kv
    reasons = []
    if need <= usable[0]:
        split: tuple[float, ...] = ()
        tp = 1
        used = [need + EXL2_OVERHEAD]
        reasons.append(f"{label} on one GPU: weights {_gib(info.file_size)} ({info.bits or '?'} bits) + KV "
                       f"{_gib(kv)} fit {_gib(usable[0])}")
    elif need <= sum(usable):
        ok = [t for t in tp_candidates(info, len(hw.gpus))[0] if t == len(hw.gpus)]
        if hw.gpu_links == "nvlink" and ok and need / ok[0] <= min(usable):
            tp = ok[0]
            split = ()
            used = [need / tp + EXL2_OVERHEAD] * tp
            reasons.append(f"{label} tensor parallel over {tp} NVLinked GPUs (TabbyAPI tensor_parallel): "
                           "faster than a layer split when the GPUs talk over NVLink")
        else:
            tp = 1
            left = need
            used_l = []
            for u in usable:
                take = min(u, left)
                used_l.append(take)
                left -= take
            used = [b + EXL2_OVERHEAD for b in used_l if b > 0]
            split = tuple(_r(b) for b in used_l if b > 0)
            reasons.append(f"{label} with a GPU split over {len(split)} GPUs (gpu_split "
                           f"{', '.join(str(s) for s in split)} GiB): layers fill one GPU after another")
    else:
        raise PlanRefused(f"{name} does not fit: weights {_gib(info.file_size)} + KV {_gib(kv)} for {conc} × {ctx} "
                          f"tokens need {_gib(need)}, the GPUs have {_gib(sum(usable))} usable "
                          f"(short by {_gib(need - sum(usable))})",
                          hint=f"a lower-bit {fmt} build, a shorter --context, fewer --concurrency, or more GPUs")
    reasons.append(f"{conc} concurrent requests (max_batch_size) × {ctx} tokens")
    if batch_note:
        reasons.append(batch_note)
    return Plan(engine=engine, backend="cuda", model=name, threads=max(1, hw.cpus), slots=conc,
                context_per_slot=ctx, gpu_layers=info.layers, total_layers=info.layers, tensor_parallel=tp,
                memory_per_gpu_gib=tuple(_r(b) for b in used),
                usable_per_gpu_gib=tuple(_r(u + EXL2_OVERHEAD) for u in usable[:len(used)]),
                gpu_split_gib=split, reasons=tuple(reasons), rejected=tuple(rejected),
                warnings=(f"{label} serves one request at a time (no flash-attn to batch with): the other "
                          f"{intent.concurrency - 1} of the {intent.concurrency} target requests wait",)
                if batch_note else ())


# ---- several servers, one service (vLLM's own multi-node) ----------------------------------------

def _node_shape(hw: Hardware) -> tuple:
    return tuple(sorted((g.name, g.memory_total_mib, g.compute_capability) for g in hw.gpus))


def plan_cluster(name: str, info: ModelInfo, nodes: list[Hardware], intent: Intent,
                 engines_available: tuple[str, ...] = ("vllm",), cuda: str = "13",
                 utilization: float = VLLM_UTILIZATION) -> Plan:
    """One model served by vLLM over `nodes` servers (each's probe), all alike. Where the model fits
    one server, one replica per server (data parallel across servers: nothing but requests crosses the
    network); where it does not, tensor parallel within a server (NVLink or PCIe) × pipeline parallel
    across servers (only activations between stages cross the network: vLLM's own advice). Refuses
    unequal servers and a model that no number of these servers would hold, naming what would."""
    if len(nodes) < 2:
        raise PlanRefused(f"{name}: a cluster plan needs two servers or more, got {len(nodes)}",
                          hint="plan one server with bundler plan --box BOX.json")
    shapes = [_node_shape(hw) for hw in nodes]
    if any(sh != shapes[0] for sh in shapes[1:]):
        def say(i: int) -> str:
            gs = nodes[i].gpus
            return f"server {i}: {len(gs)} × " + (f"{gs[0].name} ({gs[0].memory_total_mib} MiB)" if gs else "no GPU")
        odd = next(i for i, sh in enumerate(shapes) if sh != shapes[0])
        raise PlanRefused(f"{name}: the servers differ ({say(0)}; {say(odd)}); vLLM splits a model evenly over "
                          "them", hint="use servers with the same GPUs, or serve on the ones that match")
    if info.format not in ("safetensors",):
        raise PlanRefused(f"{name}: serving across servers is vLLM's, which serves safetensors; this model is "
                          f"{info.format}", hint="a safetensors build of the model, or one server")
    hw = nodes[0]
    n, N, conc = len(hw.gpus), len(nodes), intent.concurrency
    try:  # one replica per server when one server holds the model for its share of the load
        one = _plan_vllm(name, info, hw, Intent(math.ceil(conc / N), intent.context), engines_available, cuda,
                         utilization)
    except PlanRefused:
        one = None
    if one is not None:
        why = (f"across {N} servers: {name} fits one ({one.reasons[0]}), so each server runs "
               f"{one.data_parallel} replica(s) of tensor parallel {one.tensor_parallel}: data parallel "
               f"{one.data_parallel * N} in all, ~{math.ceil(conc / N)} of the {conc} requests on each server; "
               "only requests cross the network (a pipeline over servers would send every token's activations "
               "between them)")
        return replace(one, nodes=N, slots=conc, data_parallel=one.data_parallel * N,
                       reasons=(why, *one.reasons[1:]),
                       warnings=tuple(w.replace("target requests", "requests of one server's share")
                                      for w in one.warnings))
    ctx = min(intent.context, info.context_length or intent.context)
    gpu_bytes = min(g.memory_total_mib for g in hw.gpus) * MiB
    usable = gpu_bytes * utilization - VLLM_OVERHEAD
    tps, _ = tp_candidates(info, n)
    tp = max(t for t in tps if t <= n) if tps else 1
    if info.layers and info.layers < N:
        raise PlanRefused(f"{name}: {info.layers} layers cannot be split over {N} servers", hint="fewer servers")
    weights = info.file_size / (tp * N)
    kv_tok = kv_per_gpu_per_token(info, tp) / N
    full = int((usable - weights) // (kv_tok * ctx)) if usable > weights else 0
    if full < 1:
        per_gpu = info.file_size / (tp * N) + kv_tok * ctx + VLLM_OVERHEAD
        need_nodes = math.ceil(info.file_size / (tp * max(1.0, usable - kv_tok * ctx * N)))
        raise PlanRefused(f"{name} does not fit {N} servers of {n} × {hw.gpus[0].name}: each GPU would need "
                          f"{_gib(per_gpu)} for weights, one request of {ctx} tokens and vLLM's overhead, "
                          f"{_gib(gpu_bytes * utilization)} allowed",
                          hint=f"about {max(N + 1, need_nodes)} such servers, a quantized build (AWQ/GPTQ/FP8), "
                               "or a shorter --context")
    est = weights + kv_tok * min(conc, full) * ctx + VLLM_OVERHEAD
    seqs, seqs_why = vllm_max_num_seqs(min(hw.gpus, key=lambda g: g.memory_total_mib), conc)
    reasons = (f"vLLM across {N} servers: {name} ({_gib(info.file_size)}) does not fit one server of {n} × "
               f"{hw.gpus[0].name}; tensor parallel {tp} within each server × pipeline parallel {N} across them "
               f"(vLLM's advice: TP over the fast links inside a server, PP over the network, which carries only "
               f"activations between stages): {_gib(weights)} of weights per GPU",
               f"KV for {min(conc, full)} requests × {ctx} tokens at once fits beside them "
               f"({_gib(kv_tok * 1024)} per 1,024 tokens per GPU)", seqs_why,
               f"--max-model-len {ctx}, --gpu-memory-utilization {utilization:g}; estimate {_gib(est)} per GPU of "
               f"{_gib(gpu_bytes * utilization)} allowed")
    warns = (f"{full} of the {conc} target requests fit at full length ({ctx} tokens) at once; the rest queue",) \
        if full < conc else ()
    return Plan(engine="vllm", backend="cuda", model=name, threads=max(1, hw.cpus), slots=conc, context_per_slot=ctx,
                gpu_layers=info.layers, total_layers=info.layers, tensor_parallel=tp, data_parallel=1,
                pipeline_parallel=N, nodes=N, memory_per_gpu_gib=tuple(_r(est) for _ in range(tp)),
                usable_per_gpu_gib=tuple(_r(gpu_bytes * utilization) for _ in range(tp)), max_model_len=ctx,
                max_num_seqs=seqs, gpu_memory_utilization=utilization, reasons=reasons,
                rejected=({"engine": "llama.cpp", "why": "serves GGUF only, and its RPC backend across servers "
                           "calls itself fragile and insecure"},), warnings=warns)
