"""ExLlama's planner (core): an EXL2 or EXL3 model on one GPU, split across GPUs, or tensor parallel
over NVLinked ones; ExLlamaV2 batches only with flash-attn, which no bundle carries, so it serves
one request at a time and the plan says which build would serve the load instead.

Memory: 95 % of free memory less 1 GiB per GPU for activations.
"""

from __future__ import annotations

from ...errors import PlanRefused
from ...modelinfo import ModelInfo
from ...probe import Hardware
from ...sizing import GiB, Intent, MiB, Offer, Plan, gib, r, require_gpu_engine, tp_candidates
from . import BY_FORMAT, GENS


def plan(name: str, info: ModelInfo, hw: Hardware, intent: Intent, task: str, offer: Offer) -> Plan:
    return _plan_exl(name, info, hw, intent, offer.engines, offer.cuda)


GPU_FRACTION = 0.95  # of each GPU's free memory, as for llama.cpp
EXL2_OVERHEAD = 1 * GiB


def _plan_exl(name: str, info: ModelInfo, hw: Hardware, intent: Intent, engines: tuple[str, ...],
              cuda: str) -> Plan:
    g = BY_FORMAT[info.format]  # the quant_method in the model's config names the generation
    gen = g.name[-1]  # "2" | "3"
    engine, label, fmt = g.name, g.label, info.format.upper()
    rejected = [{"engine": "llama.cpp", "why": "serves GGUF only"},
                {"engine": "vllm", "why": f"serves no {fmt} quantization"},
                *({"engine": o.name, "why": f"{o.label} does not load {fmt}"} for o in GENS.values() if o is not g)]
    require_gpu_engine(name, fmt, engine, label, g.min_cc, engines, hw, cuda, "a GGUF build for llama.cpp")
    ctx = min(intent.context, info.context_length or intent.context)
    conc = intent.concurrency
    batch_note = ""
    if gen == "2" and "flash-attn" not in engines and conc > 1:
        # exllamav2's paged (batching) generator needs flash-attn, which has no wheel to carry: TabbyAPI
        # refused to load on cc >= 8 without it (../shared/EXLLAMA.md); unpaged, one request at a time
        batch_note = (f"ExLlamaV2 serves ONE request at a time here: batching needs flash-attn (paged attention), "
                      f"which this bundle does not carry; the other {conc - 1} of the {conc} concurrent requests "
                      "wait (measured on one H100: 8 concurrent requests served 1.04x the tokens/s of one, the "
                      "first token after 3.4 s; ExLlamaV3 served 1.79x, docs/BENCHMARKS.md). For that load, "
                      "rather: an EXL3 build (ExLlamaV3 batches with its Triton kernels), "
                      "an AWQ/GPTQ safetensors build with vLLM, or a GGUF with llama.cpp (both batch)")
        conc = 1
    usable = [max(0, g.memory_free_mib * MiB * GPU_FRACTION - EXL2_OVERHEAD) for g in hw.gpus]
    kv = info.kv_bytes_per_token() * conc * ctx
    need = info.file_size + kv
    reasons = []
    if need <= usable[0]:
        split: tuple[float, ...] = ()
        tp = 1
        used = [need + EXL2_OVERHEAD]
        reasons.append(f"{label} on one GPU: weights {gib(info.file_size)} ({info.bits or '?'} bits) + KV "
                       f"{gib(kv)} fit {gib(usable[0])}")
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
            split = tuple(r(b) for b in used_l if b > 0)
            reasons.append(f"{label} with a GPU split over {len(split)} GPUs (gpu_split "
                           f"{', '.join(str(s) for s in split)} GiB): layers fill one GPU after another")
    else:
        raise PlanRefused(f"{name} does not fit: weights {gib(info.file_size)} + KV {gib(kv)} for {conc} × {ctx} "
                          f"tokens need {gib(need)}, the GPUs have {gib(sum(usable))} usable "
                          f"(short by {gib(need - sum(usable))})",
                          hint=f"a lower-bit {fmt} build, a shorter --context, fewer --concurrency, or more GPUs")
    reasons.append(f"{conc} concurrent requests (max_batch_size) × {ctx} tokens")
    if batch_note:
        reasons.append(batch_note)
    return Plan(engine=engine, backend="cuda", model=name, threads=max(1, hw.cpus), slots=conc,
                context_per_slot=ctx, gpu_layers=info.layers, total_layers=info.layers, tensor_parallel=tp,
                memory_per_gpu_gib=tuple(r(b) for b in used),
                usable_per_gpu_gib=tuple(r(u + EXL2_OVERHEAD) for u in usable[:len(used)]),
                gpu_split_gib=split, reasons=tuple(reasons), rejected=tuple(rejected),
                warnings=(f"{label} serves one request at a time (no flash-attn to batch with): the other "
                          f"{intent.concurrency - 1} of the {intent.concurrency} target requests wait",)
                if batch_note else ())

