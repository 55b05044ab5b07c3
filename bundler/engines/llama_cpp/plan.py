"""llama.cpp's planner (core): a GGUF model on this box's GPUs when weights and KV for the load fit,
a partial offload (-ngl) when they do not, else the CPU build at the best instruction-set level it
carries; for an embedding model, llama-server --embedding.

Memory model (the rest is in bundler/sizing.py):
- llama.cpp on a GPU: 95 % of free memory, less 600 MiB for the CUDA context and compute buffers
  (llama-server logs ~300-500 MiB of CUDA compute buffer for a 512-token ubatch on 8B models).
- llama.cpp on the CPU: 85 % of available RAM; 256 MiB + 64 MiB per slot of compute buffers.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import PlanRefused
from ...modelinfo import ModelInfo, fallback_template
from ...probe import Hardware
from ...sizing import (BASE_OVERHEAD, EMBED_CONTEXT, EMBED_THREADS_SHARE, MIN_CONTEXT, RAM_FRACTION, Intent, MiB,
                       Offer, Plan, gib, gpu_problem, r, ram_needed)
from . import CPU_VARIANTS, NAME, best_cpu_variant

MIN_CC = 5.0  # the compute capability the CUDA build runs on


def plan(name: str, info: ModelInfo, hw: Hardware, intent: Intent, task: str, offer: Offer) -> Plan:
    """llama.cpp's plan for a GGUF model: the CUDA build where the GPUs serve it, else the CPU build."""
    if task == "embed":
        return _plan_embed(name, info, hw, intent, offer)
    p = _plan_gguf(name, info, hw, intent, offer.engines, offer.cpu_flags_needed, offer.cuda, offer.cuda_cpu_flags)
    return _with_cpu_variant(p, hw, offer.cpu_variants) if p.backend == "cpu" else p


def _plan_embed(name: str, info: ModelInfo, hw: Hardware, intent: Intent, offer: Offer) -> Plan:
    """An embedding GGUF: llama-server --embedding, one forward pass per input, no generation."""
    ctx = min(intent.context, info.context_length or intent.context, EMBED_CONTEXT)
    why = (f"embedding model: inputs of up to {ctx} tokens (the model's trained context, at most {EMBED_CONTEXT}: "
           "a chunk of a document), one forward pass each")
    p = _plan_gguf(name, info, hw, Intent(intent.concurrency, ctx), offer.engines, offer.cpu_flags_needed, offer.cuda,
                   offer.cuda_cpu_flags)
    if p.backend == "cpu":
        p = _with_cpu_variant(p, hw, offer.cpu_variants)
    threads = max(1, hw.cpus // EMBED_THREADS_SHARE) if p.backend == "cpu" else p.threads
    pooling = "" if info.pooling else "mean"
    reasons = [why, *(x for x in p.reasons if "chat template" not in x)]
    if p.backend == "cpu":
        reasons.append(f"{threads} thread(s) of {hw.cpus}: the chat model keeps every core, embeddings are short")
    reasons.append(f"pooling {info.pooling} (the GGUF's own)" if info.pooling else
                   "mean pooling: the GGUF names none (a language model used for embeddings)")
    return replace(p, threads=threads, task="embed", pooling=pooling, chat_template="", reasons=tuple(reasons))


# llama.cpp on the CPU batches only until the cores are busy: on 2 cores, 4 slots served 50
# concurrent requests at 74.2 tok/s and 50 slots at 67.3 (gemma 3 270M, docs/BENCHMARKS.md), so
# the slots stop at 2 per core (4 at least, llama-server's own default) and further requests
# wait in llama-server's queue. Beyond 2 cores this is untested; --tune tries twice the slots.
CPU_SLOTS_PER_CORE = 2


CPU_MIN_SLOTS = 4


LLAMA_GPU_FRACTION = 0.95


LLAMA_GPU_OVERHEAD = 600 * MiB


def _with_cpu_variant(p: Plan, hw: Hardware, variants: tuple[str, ...]) -> Plan:
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
    gpu_why = gpu_problem(hw.gpus, NAME, MIN_CC, cuda)
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
                           f"{gib(need)}, usable RAM is {gib(budget)}")
            ctx = fit_ctx
        else:
            fit_slots = slots
            while fit_slots > 1 and ram_needed(info, fit_slots, MIN_CONTEXT) > budget:
                fit_slots -= 1
            if ram_needed(info, fit_slots, MIN_CONTEXT) > budget:
                short = ram_needed(info, 1, MIN_CONTEXT) - budget
                raise PlanRefused(
                    f"{name} does not fit in RAM: needs {gib(ram_needed(info, 1, MIN_CONTEXT))} for one "
                    f"request of {MIN_CONTEXT} tokens, usable RAM is {gib(budget)} (short by {gib(short)})",
                    hint="free memory, add RAM, bundle a smaller quantization (e.g. Q4_K_M is ~30 % of F16), "
                         "or use GPUs with a CUDA build")
            reasons.append(f"slots lowered from {slots} to {fit_slots} at {MIN_CONTEXT} tokens each to fit "
                           f"usable RAM {gib(budget)}")
            slots, ctx = fit_slots, MIN_CONTEXT
    else:
        reasons.append(f"{slots} slots × {ctx} tokens each")
    need = ram_needed(info, slots, ctx)
    reasons.append(f"memory estimate {gib(need)} = weights {gib(info.file_size)} + KV cache "
                   f"{gib(kv_tok * slots * ctx)} ({kv_tok / 1024:.1f} KiB/token) + buffers; "
                   f"usable RAM {gib(budget)} of {gib(hw.ram_available)} available")
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
        reasons.append(f"one GPU is enough (needs {gib(need_all)} of {gib(usable[0])}): llama.cpp gains nothing "
                       f"from splitting it over {len(gpus)} (--split-mode none); the other GPUs stay free. For "
                       "throughput over several GPUs, serve a safetensors build with vLLM (data parallel)")
        gpus, usable, total_usable = gpus[:1], usable[:1], usable[0]
    if need_all <= total_usable:
        ngl = L
        reasons.insert(0, f"llama.cpp with every layer on {len(gpus)} GPU(s): weights {gib(info.file_size)} + "
                          f"KV for {slots} slots × {ctx} tokens {gib(kv_layer_tok * L * tokens)} fit "
                          f"{gib(total_usable)} usable GPU memory")
        on_gpu = need_all
        cpu_bytes = 0.0
    else:
        ngl = int((total_usable - per_layer) // (per_layer + kv_layer_tok * tokens))
        ngl = max(0, min(ngl, L - 1))
        if ngl == 0:
            rejected.append({"engine": "llama.cpp (cuda)",
                             "why": f"not one layer with its KV fits {gib(total_usable)} usable GPU memory"})
            return None
        on_gpu = per_layer + ngl * (per_layer + kv_layer_tok * tokens)
        cpu_bytes = (L - ngl) * (per_layer + kv_layer_tok * tokens)
        if cpu_bytes + BASE_OVERHEAD > hw.ram_available * RAM_FRACTION:
            rejected.append({"engine": "llama.cpp (cuda, partial offload)",
                             "why": f"the {L - ngl} layers left for the CPU need {gib(cpu_bytes)}, more than "
                                    f"usable RAM {gib(hw.ram_available * RAM_FRACTION)}"})
            return None
        reasons.insert(0, f"llama.cpp with partial offload: {ngl} of {L} layers on {len(gpus)} GPU(s), the rest on "
                          f"{hw.cpus} CPU threads: everything needs {gib(need_all)}, the GPUs have "
                          f"{gib(total_usable)} usable (short by {gib(need_all - total_usable)}; a smaller "
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
    reasons.append(f"memory estimate per GPU {', '.join(gib(b) for b in per_gpu)} "
                   f"(usable {', '.join(gib(u + LLAMA_GPU_OVERHEAD) for u in usable)})")
    if twhy:
        reasons.append(twhy)
    return Plan(engine="llama.cpp", backend="cuda", model=name, threads=max(1, hw.cpus), slots=slots,
                context_per_slot=ctx, gpu_layers=ngl, total_layers=L, ram_bytes=int(cpu_bytes + BASE_OVERHEAD),
                memory_per_gpu_gib=tuple(r(b) for b in per_gpu),
                usable_per_gpu_gib=tuple(r(u + LLAMA_GPU_OVERHEAD) for u in usable),
                chat_template=template, tensor_split=split, single_gpu=single, reasons=tuple(reasons),
                rejected=tuple(rejected),
                warnings=(f"partial offload: {ngl} of {L} layers on the GPU, the rest on the CPU (much slower)",)
                if ngl < L else ())

