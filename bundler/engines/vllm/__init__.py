"""vLLM for safetensors models on NVIDIA GPUs, box side: its command line for a plan, its offline
environment, its cache folders, the log lines after which it never becomes healthy, and the
tensor-parallel flags that are safe where NVLink multicast is off. vLLM runs on the box's own python
with PYTHONPATH pointing at the wheels the installer unpacked (a venv with --system-site-packages does
not see a venv's torch). The bundle side is engines/vllm/build.py and bundler/boxlock.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ...errors import BundlerError
from ...versions import version_tuple
from ..base import HUB_OFFLINE_ENV, Engine, Launch
NAME = "vllm"
FORMATS = ("safetensors",)
DEFAULT_VERSION = "0.26.0"  # the newest that pins torch 2.11.0 (docs/DESIGN.md)
GPU_STACK = ("torch", "torchvision", "torchaudio", "triton", "nvidia-")


# Flags that avoid the all-reduce paths which crashed with tensor parallel where
# NVLink multicast is off (VMs, PCIe cards, the GPU test boxes): vLLM's custom
# all-reduce, and the all-reduce + RMSNorm fusion of its compiler. On 2×H200 with
# vLLM 0.26.0, TP 2 died with "illegal memory access" in torch's symmetric-memory
# all-reduce right after "Enabled custom fusions: allreduce_rms" (docs/BENCHMARKS.md);
# docs/DESIGN.md saw the same class of crash with 0.33, whose switch is named differently.
def safe_tp_flags(version: str) -> list[str]:

    key = "fuse_allreduce_rms" if version_tuple(version)[:2] < (0, 33) else "enable_fi_allreduce_fusion"
    return ["--disable-custom-all-reduce", "--compilation-config", f'{{"pass_config": {{"{key}": false}}}}']


# Log lines after which a starting vLLM never becomes healthy (its API server can
# hang on after the engine died, so the process alone does not tell).
FATAL_LOG = ("Engine core initialization failed", "an illegal memory access was encountered",
             "CUBLAS_STATUS_INTERNAL_ERROR", "Worker failed with error", "CUDA out of memory")


# Where these say NVLink multicast is off (shared GPU hosts, VMs), TP > 1 starts with the safe flags at
# once instead of after a crash, and the launch script keeps them for the service (a systemd unit
# does not inherit the installer's environment).
MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_env(environ: dict[str, str]) -> dict[str, str]:
    """The multicast switches set in `environ`, to pass on to the engine."""
    return {k: environ[k] for k in MULTICAST_ENV if k in environ}


def multicast_off(environ: dict[str, str]) -> bool:
    return any(environ.get(k, "").strip() == off for k, off in MULTICAST_ENV.items())


# Compiled kernels go under one cache directory, not the HOME of whoever started the engine: vLLM's
# first start JIT-compiles for minutes (FlashInfer, Triton, torch.compile) and every later release on
# the box reuses them. Variable → subdirectory of that cache.
CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "FLASHINFER_WORKSPACE_BASE": "", "TRITON_CACHE_DIR": "triton",
              "TORCHINDUCTOR_CACHE_DIR": "inductor"}
OFFLINE_ENV = {**HUB_OFFLINE_ENV, "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


def host_ip_env(host: str) -> dict[str, str]:
    """VLLM_HOST_IP for one box: vLLM's get_ip() otherwise opens a UDP socket towards 8.8.8.8 and, with no
    route, falls back to 0.0.0.0 after two reverse lookups of '0.0.0.0.in-addr.arpa' (the egress audit
    recorded both on the GPU box). The address the service listens on where it is one, else loopback."""
    return {"VLLM_HOST_IP": host if host and host not in ("0.0.0.0", "::", "localhost") else "127.0.0.1"}


def launch_argv(python: str, model_path: str, name: str, host: str, port: int, plan, safe: bool,
                version: str = DEFAULT_VERSION) -> list[str]:
    # `vllm serve` itself (its CLI module): what a user runs by hand, so the plan starts from the same
    # defaults, e.g. one API server process per data-parallel replica (the bare api_server module
    # runs one for all of them)
    argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", model_path, "--served-model-name", name,
            "--host", host, "--port", str(port)]
    if plan.engine_defaults:  # `vllm serve MODEL` (the key from VLLM_API_KEY, as vLLM reads it): a reference
        return argv
    argv += ["--tensor-parallel-size", str(plan.tensor_parallel),
             "--data-parallel-size", str(plan.data_parallel), "--max-model-len", str(plan.max_model_len),
             "--max-num-seqs", str(plan.max_num_seqs), "--gpu-memory-utilization", str(plan.gpu_memory_utilization),
             "--uvicorn-log-level", "warning",
             # vLLM's own key guards /v1 only: every route but /health behind it (vllm_auth.py)
             "--middleware", "bundler.engines.vllm_auth.KeyOnEveryRoute"]
    if plan.task == "embed":  # /v1/embeddings: vLLM's pooling runner (a causal LM is converted to embed)
        argv += ["--runner", "pooling"]
    if getattr(plan, "api_servers", 0) > 1:
        argv += ["--api-server-count", str(plan.api_servers)]
    argv += list(plan.extra_args)
    if safe and plan.tensor_parallel > 1:
        argv += safe_tp_flags(version)
    return argv


def cluster_args(plan, rank: int, master_addr: str, master_port: int) -> list[str]:
    """vLLM's own multi-node flags (>= 0.11.1, no Ray) for server `rank` of a plan over plan.nodes servers:
    pipeline parallel across servers (--nnodes/--node-rank/--master-addr), or data-parallel replicas
    across them (--data-parallel-size-local/-start-rank/-address); every server but the first headless."""
    if plan.nodes <= 1:
        return []
    if plan.pipeline_parallel > 1:
        args = ["--pipeline-parallel-size", str(plan.pipeline_parallel), "--nnodes", str(plan.nodes),
                "--node-rank", str(rank), "--master-addr", master_addr, "--master-port", str(master_port)]
    else:
        # the head's API spreads requests over every replica (vLLM's internal load balancing): a start rank
        # on the head would switch vLLM to external balancing, where each server serves its own API, and
        # the head then refuses its headless workers (vLLM 0.32 on CPUs: tests/e2e/test_cluster.py)
        local = max(1, plan.data_parallel // plan.nodes)
        args = ["--data-parallel-size-local", str(local),
                *(["--data-parallel-start-rank", str(rank * local)] if rank else []),
                "--data-parallel-address", master_addr, "--data-parallel-rpc-port", str(master_port)]
    return args + (["--headless"] if rank else [])


def cluster_env(address: str, interface: str) -> dict[str, str]:
    """What each server's vLLM needs offline: the address it advertises (get_ip() would probe 8.8.8.8 and
    fall back to 0.0.0.0) and the interface NCCL and Gloo use (Gloo otherwise takes loopback)."""
    return {"VLLM_HOST_IP": address, "NCCL_SOCKET_IFNAME": interface, "GLOO_SOCKET_IFNAME": interface}


def cluster(plan, rank: int, head: str, port: int, address: str, interface: str) -> tuple[list[str], dict[str, str]]:
    """Server `rank`'s part of one service over several: vLLM's multi-node flags and its cluster environment."""
    return cluster_args(plan, rank, head, port), cluster_env(address, interface)


def launch(ctx) -> Launch:
    """vLLM's start: its wheels, then the release's own site (the middleware that guards every route)."""
    site = ctx.site()
    argv = launch_argv(ctx.python, ctx.model_path, ctx.name, ctx.host, ctx.port, ctx.plan, ctx.safe,
                       ctx.entry["version"])
    env = {"PYTHONPATH": f"{site}:{ctx.final / 'site'}", **OFFLINE_ENV, **host_ip_env(ctx.host),
           **multicast_env(ctx.environ)}
    cache = dict(CACHE_VARS)
    tools = ctx.triton_tools()
    if not tools["flashinfer_jit"]:
        env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    ctx.triton_cc(tools, site, env, cache)
    return Launch(argv, env, cache)


def alternatives(plan, facts, hw, version: str = "") -> list[tuple[str, object, str]]:
    """What --tune starts beside the plan: the other splits of the GPUs that fit, the API server count,
    vLLM's throughput mode."""
    out = []
    n = len(hw.gpus)
    gpu = min(hw.gpus, key=lambda g: g.memory_total_mib)
    usable = gpu.memory_total_mib * vplan.MiB * vplan.VLLM_UTILIZATION - vplan.VLLM_OVERHEAD
    for tp in vplan.tp_candidates(facts, n)[0]:
        dp = n // tp
        if (tp, dp) == (plan.tensor_parallel, plan.data_parallel):
            continue
        if facts.file_size / tp + vplan.kv_per_gpu_per_token(facts, tp) * plan.max_model_len > usable:
            continue  # one request of full length does not fit
        seqs, _ = vplan.vllm_max_num_seqs(gpu, math.ceil(plan.slots / dp))
        api = plan.api_servers if dp == 1 else 0
        out.append((f"TP {tp} x DP {dp}", replace(plan, tensor_parallel=tp, data_parallel=dp, max_num_seqs=seqs,
                                                  api_servers=api), "another split of the GPUs"))
    if plan.data_parallel == 1 and plan.api_servers > 1:
        out.append(("plan, 1 API server", replace(plan, api_servers=0),
                    "one front-end process, as vLLM starts by default"))
    if plan.data_parallel == 1 and hw.cpus >= 16:
        out.append(("plan, 4 API servers", replace(plan, api_servers=4),
                    "more front-end processes for streaming and detokenizing many requests"))
    if version_tuple(version or DEFAULT_VERSION)[:2] >= (0, 26):
        out.append(("plan + throughput mode", replace(plan, extra_args=("--performance-mode", "throughput")),
                    "vLLM's throughput mode: twice the batched tokens per step"))
    return out


def override(plan, facts, hw, tp: int | None, dp: int | None):
    """--tensor-parallel / --data-parallel in place of the planner's split, within what fits."""
    tp = tp or plan.tensor_parallel
    dp = dp or max(1, len(hw.gpus) // tp)
    ok, _ = vplan.tp_candidates(facts, len(hw.gpus))
    if tp not in ok or tp * dp > len(hw.gpus):
        raise BundlerError(f"tensor parallel {tp} × data parallel {dp} does not fit this model on {len(hw.gpus)} "
                           "GPU(s)", hint=f"tensor-parallel sizes that work here: {', '.join(map(str, ok))}")
    share = max(1, -(-plan.slots // dp))
    seqs, _ = vplan.vllm_max_num_seqs(min(hw.gpus, key=lambda g: g.memory_total_mib), share)
    return replace(plan, tensor_parallel=tp, data_parallel=dp, max_num_seqs=seqs,
                   api_servers=vplan.vllm_api_servers(hw, dp),
                   reasons=(*plan.reasons, f"overridden on the command line: tensor parallel {tp} × data parallel "
                                           f"{dp}, ~{share} of the {plan.slots} requests per replica, --max-num-seqs "
                                           f"{seqs}"))


def summary(plan) -> str:
    across = f"{plan.nodes} servers, PP {plan.pipeline_parallel}, " if plan.nodes > 1 else ""
    api = f", --api-server-count {plan.api_servers}" if plan.api_servers > 1 else ""
    return (f"{across}TP {plan.tensor_parallel} x DP {plan.data_parallel}, --max-num-seqs {plan.max_num_seqs}, "
            f"--max-model-len {plan.max_model_len}{api}")


from . import plan as vplan  # noqa: E402 - its planner needs NAME above

ENGINE = Engine(NAME, "vLLM", FORMATS, triton=True, slow_start=True, fatal_log=FATAL_LOG, serial_start=True,
                tp_retry=True, flashinfer=True, python=True, reference="`vllm serve MODEL`",
                # vLLM's own key guarded /v1 only: these were open before vllm_auth.py
                guarded=(("GET", "/v1/models"), ("POST", "/invocations"), ("POST", "/tokenize"),
                         ("POST", "/pooling"), ("GET", "/metrics"), ("GET", "/openapi.json")),
                launch=launch, alternatives=alternatives, override=override, summary=summary,
                plan=vplan.plan, plan_cluster=vplan.plan_cluster, cluster=cluster, embeds=True,
                gpu_share=vplan.VLLM_UTILIZATION)
ENGINES = (ENGINE,)
