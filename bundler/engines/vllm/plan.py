"""vLLM's planner (core): a safetensors model on the smallest tensor-parallel size that fits weights
and KV for the load (a power of two that divides the attention heads and divides or is a multiple of
the KV heads), GPUs left over as data-parallel replicas; across servers (plan_cluster) data parallel
where one server holds the model, else tensor parallel within a server × pipeline parallel across.

Memory: --gpu-memory-utilization 0.90 of total memory (vLLM's default), of which 2 GiB go to
activations, CUDA graphs and NCCL buffers (vLLM's profile run reports 1-3 GiB of non-KV, non-weight
memory for 8B-70B models).
"""

from __future__ import annotations

import math
from dataclasses import replace

from ...errors import PlanRefused
from ...modelinfo import ModelInfo
from ...probe import Gpu, Hardware
from ...sizing import (EMBED_CONTEXT, GPU_SHARE, GiB, Intent, MiB, Offer, Plan, gib, kv_per_gpu_per_token, r,
                       refuse_gpu_model, require_gpu_engine, tp_candidates)

from . import NAME

MIN_CC = 7.0  # the compute capability its kernels need (quantized models: VLLM_QUANT_MIN_CC)


def plan(name: str, info: ModelInfo, hw: Hardware, intent: Intent, task: str, offer: Offer) -> Plan:
    if task == "embed":
        return _plan_embed(name, info, hw, intent, offer)
    return _plan_vllm(name, info, hw, intent, offer.engines, offer.cuda, offer.gpu_share)


def _plan_embed(name: str, info: ModelInfo, hw: Hardware, intent: Intent, offer: Offer) -> Plan:
    """An embedding model on vLLM's pooling runner: one GPU, with a small memory share."""
    ctx = min(intent.context, info.context_length or intent.context, EMBED_CONTEXT)
    why = (f"embedding model: inputs of up to {ctx} tokens (the model's trained context, at most {EMBED_CONTEXT}: "
           "a chunk of a document), one forward pass each")
    require_gpu_engine(name, "safetensors", NAME, "vLLM", MIN_CC, offer.engines, hw, offer.cuda,
                       "a GGUF build of the model to serve it with llama.cpp on the CPU")
    gpu = min(hw.gpus, key=lambda g: g.memory_total_mib)
    seqs = min(max(intent.concurrency, 8), 256)
    need = info.file_size + VLLM_OVERHEAD + kv_per_gpu_per_token(info, 1) * ctx * min(seqs, 16)
    util = min(VLLM_UTILIZATION, math.ceil(need / (gpu.memory_total_mib * MiB) * 100) / 100)
    return Plan(engine=NAME, backend="cuda", model=name, threads=max(1, hw.cpus), slots=seqs,
                context_per_slot=ctx, gpu_layers=info.layers, total_layers=info.layers,
                memory_per_gpu_gib=(r(need),), usable_per_gpu_gib=(r(util * gpu.memory_total_mib * MiB),),
                max_model_len=ctx, max_num_seqs=seqs, gpu_memory_utilization=util, task="embed",
                reasons=(why, f"vLLM's pooling runner on GPU {gpu.index}, tensor parallel 1: "
                              f"--gpu-memory-utilization {util:g} holds its weights ({gib(info.file_size)}), "
                              f"vLLM's overhead and {min(seqs, 16)} inputs at once; the rest is the chat model's"),
                rejected=({"engine": "llama.cpp", "why": "serves GGUF only"},))


VLLM_UTILIZATION = GPU_SHARE  # --gpu-memory-utilization: vLLM's own default


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


# The compute capability vLLM's kernels need per quantization (vLLM's "supported hardware" table):
# AWQ from Turing, GPTQ and bitsandbytes from Volta, FP8 from Ampere (weight-only Marlin; W8A8 from
# Ada), Marlin kernels and compressed-tensors' W4A16 from Ampere.
VLLM_QUANT_MIN_CC = {"awq": 7.5, "awq_marlin": 8.0, "gptq": 7.0, "gptq_marlin": 8.0, "marlin": 8.0,
                     "bitsandbytes": 7.0, "fp8": 8.0, "compressed-tensors": 8.0, "modelopt": 8.9, "mxfp4": 8.0}


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


def _plan_vllm(name: str, info: ModelInfo, hw: Hardware, intent: Intent, engines: tuple[str, ...],
               cuda: str, utilization: float = VLLM_UTILIZATION) -> Plan:
    rejected = [{"engine": "llama.cpp", "why": "serves GGUF only; convert the model to GGUF to use it"},
                {"engine": "exllamav2/exllamav3", "why": "serve EXL2/EXL3 only"}]
    require_gpu_engine(name, "safetensors", NAME, "vLLM", MIN_CC, engines, hw, cuda,
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
            reasons.append(f"quantization {label}: {gib(info.file_size)} of weights as stored; vLLM's kernels for it "
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
        raise refuse_gpu_model(name, info, hw, "vLLM", usable, ctx, tps)
    tp = fitting if fitting is not None else max(held, key=lambda t: (held[t], -t))
    head = (f"vLLM: safetensors on {n} GPU(s) with compute capability {hw.gpus[0].compute_capability}; "
            f"tensor parallel {tp}")
    if fitting is None:
        head += f": weights {gib(info.file_size / tp)} per GPU, {gib(usable)} usable"
        reasons.append(f"KV for {conc} requests of {ctx} tokens does not fit any TP size; TP {tp} holds the "
                       f"most: {held[tp]} at full length at once (paged KV packs more when requests are shorter; "
                       "vLLM queues the rest; more GPUs or a shorter context serve more)")
    else:
        smaller = [t for t in tps if t < tp]
        head += (f" is the smallest size whose share of weights ({gib(info.file_size / tp)}) and KV for "
                 f"{layouts[tp][1]} requests × {ctx} tokens per replica fits {gib(usable)} per GPU"
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
                   f"estimate {gib(est)} per GPU for the target load of {conc}, of "
                   f"{gib(gpu_bytes * utilization)} allowed (the rest is KV cache for more)")
    used = tp * dp
    return Plan(engine="vllm", backend="cuda", model=name, threads=max(1, hw.cpus), slots=conc,
                context_per_slot=ctx, gpu_layers=info.layers, total_layers=info.layers, tensor_parallel=tp,
                data_parallel=dp, memory_per_gpu_gib=tuple(r(est) for _ in range(used)),
                usable_per_gpu_gib=tuple(r(gpu_bytes * utilization) for _ in range(used)),
                max_model_len=ctx, max_num_seqs=seqs, gpu_memory_utilization=utilization, api_servers=api,
                reasons=tuple(reasons), rejected=tuple(rejected),
                warnings=(f"{min(per_replica, full_fit) * dp} of the {conc} target requests fit at full length "
                          f"({ctx} tokens) at once; the rest queue (shorter requests pack more)",)
                if min(per_replica, full_fit) * dp < conc else ())


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
                          f"{gib(per_gpu)} for weights, one request of {ctx} tokens and vLLM's overhead, "
                          f"{gib(gpu_bytes * utilization)} allowed",
                          hint=f"about {max(N + 1, need_nodes)} such servers, a quantized build (AWQ/GPTQ/FP8), "
                               "or a shorter --context")
    est = weights + kv_tok * min(conc, full) * ctx + VLLM_OVERHEAD
    seqs, seqs_why = vllm_max_num_seqs(min(hw.gpus, key=lambda g: g.memory_total_mib), conc)
    reasons = (f"vLLM across {N} servers: {name} ({gib(info.file_size)}) does not fit one server of {n} × "
               f"{hw.gpus[0].name}; tensor parallel {tp} within each server × pipeline parallel {N} across them "
               f"(vLLM's advice: TP over the fast links inside a server, PP over the network, which carries only "
               f"activations between stages): {gib(weights)} of weights per GPU",
               f"KV for {min(conc, full)} requests × {ctx} tokens at once fits beside them "
               f"({gib(kv_tok * 1024)} per 1,024 tokens per GPU)", seqs_why,
               f"--max-model-len {ctx}, --gpu-memory-utilization {utilization:g}; estimate {gib(est)} per GPU of "
               f"{gib(gpu_bytes * utilization)} allowed")
    warns = (f"{full} of the {conc} target requests fit at full length ({ctx} tokens) at once; the rest queue",) \
        if full < conc else ()
    return Plan(engine="vllm", backend="cuda", model=name, threads=max(1, hw.cpus), slots=conc, context_per_slot=ctx,
                gpu_layers=info.layers, total_layers=info.layers, tensor_parallel=tp, data_parallel=1,
                pipeline_parallel=N, nodes=N, memory_per_gpu_gib=tuple(r(est) for _ in range(tp)),
                usable_per_gpu_gib=tuple(r(gpu_bytes * utilization) for _ in range(tp)), max_model_len=ctx,
                max_num_seqs=seqs, gpu_memory_utilization=utilization, reasons=reasons,
                rejected=({"engine": "llama.cpp", "why": "serves GGUF only, and its RPC backend across servers "
                           "calls itself fragile and insecure"},), warnings=warns)

