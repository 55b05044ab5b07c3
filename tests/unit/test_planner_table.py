"""The planner across boxes of 0-8 GPUs and models of 1B-72B: engine, TP/DP or
-ngl, slots, and memory per GPU within what that GPU can give."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from bundler import planner
from bundler.cli import parse_gpus
from bundler.errors import PlanRefused
from bundler.modelinfo import ModelInfo
from bundler.probe import Hardware

GiB = 1 << 30
# Shapes as published in each model's config.json: layers, heads, kv heads, head dim
SHAPES = {
    "1b": (16, 32, 8, 64, 1.24e9),
    "8b": (32, 32, 8, 128, 8.03e9),
    "70b": (80, 64, 8, 128, 70.6e9),
    "72b-qwen": (80, 64, 8, 128, 72.7e9),
    "7b-qwen": (28, 28, 4, 128, 7.6e9),
    "mixtral-8x7b": (32, 32, 8, 128, 46.7e9),
}
BYTES_PER_PARAM = {"Q4_K_M": 0.605, "Q8_0": 1.0625, "F16": 2.0, "bf16": 2.0, "exl2-4.0": 0.517, "exl3-4.0": 0.517}


def model(shape: str, quant: str) -> ModelInfo:
    layers, heads, kv, hd, params = SHAPES[shape]
    fmt = "gguf" if quant in ("Q4_K_M", "Q8_0", "F16") else quant[:4] if quant.startswith("exl") else "safetensors"
    return ModelInfo(format=fmt, architecture="llama", file_size=int(params * BYTES_PER_PARAM[quant]), layers=layers,
                     heads=heads, kv_heads=kv, head_dim_k=hd, head_dim_v=hd, context_length=131072,
                     experts=8 if shape.startswith("mixtral") else 0, has_chat_template=True,
                     bits=4.0 if fmt.startswith("exl") else 0.0)


def box(gpus: str, ram_gib: int = 256, cpus: int = 32, driver: str = "580.65") -> Hardware:
    g, links = parse_gpus(gpus, driver)
    return Hardware(cpus=cpus, ram_total=ram_gib * GiB, ram_available=ram_gib * GiB, disk_free=1 << 40,
                    disk_path="/", arch="x86_64", cpu_flags=("avx", "avx2", "f16c", "fma"), glibc="2.39",
                    python="3.12", os="test", systemd_pid1=True, gpus=tuple(g), gpu_links=links)


@dataclass
class Case:
    id: str
    model: tuple[str, str]
    gpus: str
    conc: int
    ctx: int
    engine: str | None  # None: refused
    tp: int = 1
    dp: int = 1
    ngl: str = ""  # "all", "partial", "0"
    slots: int | None = None
    ram: int = 256
    driver: str = "580.65"
    backend: str = ""
    says: str = ""  # a phrase the reasons (or the refusal) must contain


CASES = [
    Case("st-8b-1xH100", ("8b", "bf16"), "1x80GiB@9.0", 16, 4096, "vllm", 1, 1, slots=16),
    # over NVLink a fitting model still gets TP up to 4 (measured faster than DP on 4×H200), DP beyond
    Case("st-8b-8xA100-tp4-dp2", ("8b", "bf16"), "8x80GiB@8.0,nvlink", 64, 4096, "vllm", 4, 2, slots=64,
         says="data parallel 2"),
    Case("st-8b-8x80-pcie-dp8", ("8b", "bf16"), "8x80GiB@8.9", 64, 4096, "vllm", 1, 8, slots=64,
         says="data parallel 8"),
    Case("st-70b-1x80-refused", ("70b", "bf16"), "1x80GiB@9.0", 16, 4096, None, says="2 GPUs like these"),
    Case("st-70b-2x80-fewer-seqs", ("70b", "bf16"), "2x80GiB@9.0,nvlink", 16, 4096, "vllm", 2, 1,
         says="holds"),
    Case("st-70b-4x80-tp4", ("70b", "bf16"), "4x80GiB@9.0,nvlink", 32, 4096, "vllm", 4, 1, slots=32),
    Case("st-70b-8x80-tp4-dp2", ("70b", "bf16"), "8x80GiB@8.0,nvlink", 64, 4096, "vllm", 4, 2, slots=64),
    Case("st-70b-2xH200-tp2", ("70b", "bf16"), "2x141GiB@9.0,nvlink", 50, 4096, "vllm", 2, 1, slots=50),
    Case("st-72b-4x80-tp4", ("72b-qwen", "bf16"), "4x80GiB@9.0,nvlink", 16, 8192, "vllm", 4, 1, slots=16),
    Case("st-qwen7b-8x24-no-tp8", ("7b-qwen", "bf16"), "8x24GiB@8.9", 64, 4096, "vllm", 1, 8, slots=64,
         says="TP 8: attention heads (28) are not divisible by 8"),
    Case("st-mixtral-2x80", ("mixtral-8x7b", "bf16"), "2x80GiB@9.0,nvlink", 16, 4096, "vllm", 2, 1, slots=16),
    Case("st-mixtral-4x48", ("mixtral-8x7b", "bf16"), "4x48GiB@8.9", 32, 4096, "vllm", 4, 1, slots=32),
    Case("st-8b-no-gpu", ("8b", "bf16"), "none", 4, 4096, None, says="GGUF"),
    Case("st-8b-old-driver", ("8b", "bf16"), "1x80GiB@9.0", 4, 4096, None, driver="535.104", says="580"),
    Case("st-8b-pascal", ("8b", "bf16"), "2x24GiB@6.1", 4, 4096, None, says="compute capability >= 7.0"),
    Case("st-8b-3x48-dp3", ("8b", "bf16"), "3x48GiB@8.9", 16, 4096, "vllm", 1, 3, slots=16),
    Case("st-70b-3x80-one-idle", ("70b", "bf16"), "3x80GiB@9.0,nvlink", 16, 4096, "vllm", 2, 1, says="idle"),
    Case("st-70b-4xH200-200", ("70b", "bf16"), "4x141GiB@9.0,nvlink", 200, 4096, "vllm", 4, 1, slots=200),
    Case("st-8b-4xH200-200", ("8b", "bf16"), "4x141GiB@9.0,nvlink", 200, 4096, "vllm", 4, 1, slots=200,
         says="widened to TP 4 over NVLink"),
    # a replica needs KV for its share only: 50 × 4096 tokens per H100 fits beside 8B's weights
    Case("st-8b-4x80-pcie-200-dp4", ("8b", "bf16"), "4x80GiB@9.0", 200, 4096, "vllm", 1, 4, slots=200),
    # nothing holds 200 × 4096 tokens: the TP size that holds the most wins, not the smallest that holds one
    Case("st-70b-4x80-200-most", ("70b", "bf16"), "4x80GiB@9.0,nvlink", 200, 4096, "vllm", 4, 1, slots=200,
         says="holds the most"),
    # above 50 requests per GPU, replicas of the smallest fitting TP instead of a wider TP
    Case("st-8b-2xH200-200-dp2", ("8b", "bf16"), "2x141GiB@9.0,nvlink", 200, 4096, "vllm", 1, 2, slots=200,
         says="not widened over NVLink"),
    Case("st-8b-8xH200-512-tp1-dp8", ("8b", "bf16"), "8x141GiB@9.0,nvlink", 512, 4096, "vllm", 1, 8, slots=512),
    Case("st-70b-4xH200-50-tp4", ("70b", "bf16"), "4x141GiB@9.0,nvlink", 50, 4096, "vllm", 4, 1, slots=50,
         says="widened"),
    Case("st-70b-4x141-pcie-50-tp2-dp2", ("70b", "bf16"), "4x141GiB@9.0", 50, 4096, "vllm", 2, 2, slots=50),
    Case("gguf-8b-q4-1x3090", ("8b", "Q4_K_M"), "1x24GiB@8.6", 8, 8192, "llama.cpp", ngl="all", slots=8,
         backend="cuda"),
    Case("gguf-70b-q4-1x24-partial", ("70b", "Q4_K_M"), "1x24GiB@8.9", 4, 4096, "llama.cpp", ngl="partial", slots=4,
         backend="cuda", says="partial offload"),
    Case("gguf-70b-q4-2x4090", ("70b", "Q4_K_M"), "2x24GiB@8.9", 4, 2048, "llama.cpp", ngl="all", slots=4,
         backend="cuda", says="split by layer"),
    Case("gguf-70b-q4-4x24", ("70b", "Q4_K_M"), "4x24GiB@8.9", 16, 4096, "llama.cpp", ngl="all", slots=16,
         backend="cuda"),
    Case("gguf-8b-q8-8xA100-one-gpu", ("8b", "Q8_0"), "8x80GiB@8.0,nvlink", 64, 4096, "llama.cpp", ngl="all",
         slots=64, backend="cuda", says="one GPU is enough"),
    Case("gguf-1b-cpu", ("1b", "Q4_K_M"), "none", 4, 4096, "llama.cpp", ngl="0", slots=4, ram=16, backend="cpu"),
    Case("gguf-70b-f16-cpu-refused", ("70b", "F16"), "none", 1, 2048, None, ram=64, says="short by"),
    Case("gguf-70b-q4-cpu-ctx-lowered", ("70b", "Q4_K_M"), "none", 8, 8192, "llama.cpp", ngl="0", slots=8, ram=64,
         backend="cpu", says="lowered from 8192"),
    Case("gguf-8b-old-driver-cpu", ("8b", "Q4_K_M"), "1x80GiB@9.0", 4, 4096, "llama.cpp", ngl="0", slots=4,
         driver="535.104", backend="cpu"),
    Case("gguf-8b-3x48-one-gpu", ("8b", "Q4_K_M"), "3x48GiB@8.9", 16, 4096, "llama.cpp", ngl="all", slots=16,
         backend="cuda", says="--split-mode none"),
    # EXL2 one request at a time: no flash-attn to carry (the plan says so: test_planner.py)
    Case("exl2-70b-1x48", ("70b", "exl2-4.0"), "1x48GiB@8.6", 4, 4096, "exllamav2", 1, slots=1),
    Case("exl2-70b-2x3090-nvlink-tp", ("70b", "exl2-4.0"), "2x24GiB@8.6,nvlink", 2, 4096, "exllamav2", 2, slots=1,
         says="tensor parallel"),
    Case("exl2-70b-2x3090-pcie-split", ("70b", "exl2-4.0"), "2x24GiB@8.6", 2, 4096, "exllamav2", 1, slots=1,
         says="GPU split"),
    Case("exl2-no-gpu", ("70b", "exl2-4.0"), "none", 2, 4096, None, says="NVIDIA GPUs"),
    Case("exl2-8b-1x24", ("8b", "exl2-4.0"), "1x24GiB@8.9", 8, 4096, "exllamav2", 1, slots=1, says="ONE request"),
    # EXL3 batches (ExLlamaV3's Triton kernels): the load's concurrency is its max_batch_size
    Case("exl3-8b-1x24", ("8b", "exl3-4.0"), "1x24GiB@8.9", 8, 4096, "exllamav3", 1, slots=8, says="one GPU"),
    Case("exl3-70b-2x24-pcie-split", ("70b", "exl3-4.0"), "2x24GiB@8.9", 2, 4096, "exllamav3", 1, slots=2,
         says="GPU split"),
    Case("exl3-70b-4xH100-nvlink-tp", ("70b", "exl3-4.0"), "4x80GiB@9.0,nvlink", 64, 8192, "exllamav3", 4, slots=64,
         says="tensor parallel over 4 NVLinked GPUs"),
    Case("exl3-8b-turing-refused", ("8b", "exl3-4.0"), "1x24GiB@7.5", 4, 4096, None, says="8.0"),
]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_plan_table(c: Case):
    info = model(*c.model)
    hw = box(c.gpus, ram_gib=c.ram, driver=c.driver)
    intent = planner.Intent(concurrency=c.conc, context=c.ctx)
    if c.engine is None:
        with pytest.raises(PlanRefused) as e:
            planner.plan("m", info, hw, intent, engines_available=planner.ALL_ENGINES)
        assert e.value.exit_code == 3
        assert c.says in e.value.message + " " + (e.value.hint or "")
        return
    p = planner.plan("m", info, hw, intent, engines_available=planner.ALL_ENGINES)
    assert p.engine == c.engine
    if c.backend:
        assert p.backend == c.backend
    if c.engine in ("vllm", "exllamav2", "exllamav3"):
        assert (p.tensor_parallel, p.data_parallel) == (c.tp, c.dp)
    if c.ngl == "all":
        assert p.gpu_layers == p.total_layers == info.layers
    elif c.ngl == "partial":
        assert 0 < p.gpu_layers < p.total_layers
    elif c.ngl == "0":
        assert p.gpu_layers == 0
    if c.slots is not None:
        assert p.slots == c.slots
    if c.says:
        assert c.says in " ".join(p.reasons), p.reasons
    if c.engine == "llama.cpp" and p.backend == "cuda":
        # split over several GPUs only when one cannot hold it
        assert (len(p.memory_per_gpu_gib) == 1) == (p.single_gpu or len(hw.gpus) == 1)
    _assert_sound(p, info, hw)


def _assert_sound(p: planner.Plan, info: ModelInfo, hw: Hardware) -> None:
    """What every plan must hold, whatever the case."""
    assert len(p.memory_per_gpu_gib) == len(p.usable_per_gpu_gib)
    for used, usable in zip(p.memory_per_gpu_gib, p.usable_per_gpu_gib):
        assert used <= usable
    for used, g in zip(p.memory_per_gpu_gib, hw.gpus):
        assert used * GiB <= g.memory_free_mib * (1 << 20)
    if p.engine == "vllm":
        tp = p.tensor_parallel
        assert tp & (tp - 1) == 0, "TP is a power of two"
        assert info.heads % tp == 0
        assert info.kv_heads % tp == 0 or tp % info.kv_heads == 0
        assert tp * p.data_parallel <= len(hw.gpus)
        assert p.max_num_seqs >= 1 and p.max_model_len >= 1
    if p.backend == "cpu":
        assert p.ram_bytes <= hw.ram_available * planner.RAM_FRACTION
    assert p.reasons and p.rejected


def test_random_boxes_and_models_never_break_the_rules():
    rng = random.Random(20261127)
    specs = ["none", "1x24GiB@8.6", "2x24GiB@8.9", "1x48GiB@8.9", "4x48GiB@8.9", "1x80GiB@8.0", "2x80GiB@9.0,nvlink",
             "3x80GiB@9.0", "4x80GiB@9.0,nvlink", "8x80GiB@8.0,nvlink", "2x141GiB@9.0,nvlink", "4x141GiB@9.0,nvlink",
             "8x16GiB@7.5"]
    planned = refused = 0
    for _ in range(600):
        shape = rng.choice(list(SHAPES))
        quant = rng.choice(list(BYTES_PER_PARAM))
        info = model(shape, quant)
        hw = box(rng.choice(specs), ram_gib=rng.choice([16, 64, 256, 1024]))
        intent = planner.Intent(concurrency=rng.choice([1, 4, 16, 50, 200]), context=rng.choice([1024, 4096, 32768]))
        try:
            p = planner.plan("m", info, hw, intent, engines_available=planner.ALL_ENGINES)
        except PlanRefused as e:
            refused += 1
            assert "GiB" in e.message or "GPU" in e.message or "CPU" in e.message
            continue
        planned += 1
        _assert_sound(p, info, hw)
    assert planned > 200 and refused > 20


def test_cli_gpus_spec_parsing():
    gpus, links = parse_gpus("8x80GiB@8.0,nvlink", "580.65")
    assert len(gpus) == 8 and gpus[0].memory_total_mib == 81920 and gpus[0].compute_capability == "8.0"
    assert links == "nvlink"
    assert parse_gpus("none", "") == ([], "")
    from bundler.errors import BundlerError

    with pytest.raises(BundlerError) as e:
        parse_gpus("eight", "")
    assert "COUNTxMEMORY" in e.value.hint or "COUNTxMEMORY" in e.value.message


# ---- several servers, one service (issue 25: the planner's part) ------------------------------------

def test_a_70b_in_bf16_over_two_servers_of_four_24gb_cards_is_tp_4_by_pp_2():
    nodes = [box("4x24GiB@8.9"), box("4x24GiB@8.9")]
    with pytest.raises(PlanRefused):  # one such server does not hold it
        planner.plan("llama-70b", model("70b", "bf16"), nodes[0], planner.Intent(8, 4096),
                     engines_available=planner.ALL_ENGINES)
    p = planner.plan_cluster("llama-70b", model("70b", "bf16"), nodes, planner.Intent(8, 4096))
    assert (p.engine, p.tensor_parallel, p.pipeline_parallel, p.nodes, p.data_parallel) == ("vllm", 4, 2, 2, 1)
    assert "pipeline parallel 2 across them" in p.reasons[0]
    assert all(used <= usable for used, usable in zip(p.memory_per_gpu_gib, p.usable_per_gpu_gib))
    from bundler.engines import vllm

    head, worker = (vllm.cluster_args(p, r, "10.0.0.1", 29500) for r in (0, 1))
    assert head == ["--pipeline-parallel-size", "2", "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1",
                    "--master-port", "29500"]
    assert worker[-1] == "--headless" and worker[worker.index("--node-rank") + 1] == "1"
    assert vllm.cluster_env("10.0.0.2", "eth1") == {"VLLM_HOST_IP": "10.0.0.2", "NCCL_SOCKET_IFNAME": "eth1",
                                                    "GLOO_SOCKET_IFNAME": "eth1"}


@pytest.mark.parametrize("load", [50, 200])
def test_an_8b_on_two_servers_of_one_gpu_runs_a_replica_on_each(load):
    nodes = [box("1x80GiB@9.0"), box("1x80GiB@9.0")]
    p = planner.plan_cluster("llama-8b", model("8b", "bf16"), nodes, planner.Intent(load, 4096))
    assert (p.tensor_parallel, p.pipeline_parallel, p.data_parallel, p.nodes, p.slots) == (1, 1, 2, 2, load)
    assert "only requests cross the network" in p.reasons[0]
    from bundler.engines import vllm

    assert vllm.cluster_args(p, 1, "10.0.0.1", 29550) == [
        "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1", "--data-parallel-address", "10.0.0.1",
        "--data-parallel-rpc-port", "29550", "--headless"]
    # the head sets no start rank: with one, vLLM balances externally and refuses its headless workers
    assert vllm.cluster_args(p, 0, "10.0.0.1", 29550) == [
        "--data-parallel-size-local", "1", "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", "29550"]


def test_unequal_servers_and_a_model_no_two_servers_hold_are_refused_naming_what_would():
    with pytest.raises(PlanRefused) as e:
        planner.plan_cluster("llama-70b", model("70b", "bf16"), [box("4x24GiB@8.9"), box("2x24GiB@8.9")],
                             planner.Intent(8, 4096))
    assert "servers differ" in e.value.message and "server 1: 2 ×" in e.value.message
    with pytest.raises(PlanRefused) as e:
        planner.plan_cluster("llama-70b", model("70b", "bf16"), [box("1x24GiB@8.9"), box("1x24GiB@8.9")],
                             planner.Intent(8, 4096))
    assert "does not fit 2 servers" in e.value.message and "such servers" in e.value.hint
    with pytest.raises(PlanRefused, match="vLLM's, which serves safetensors"):
        planner.plan_cluster("q", model("70b", "Q4_K_M"), [box("1x80GiB@9.0"), box("1x80GiB@9.0")],
                             planner.Intent(8, 4096))


def test_bundler_plan_sizes_a_service_over_several_servers(tmp_path):
    """`bundler plan --servers N`: how a model spreads over N servers like the one described, or what
    would hold it when N do not."""
    import json
    import subprocess
    import sys

    facts = tmp_path / "llama-70b.json"
    facts.write_text(json.dumps(model("70b", "bf16").to_dict()))
    run = [sys.executable, "-m", "bundler.cli", "plan", "--model", str(facts), "--gpus", "4x24GiB@8.9",
           "--concurrency", "8"]
    r = subprocess.run([*run, "--servers", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert (p["tensor_parallel"], p["pipeline_parallel"], p["nodes"]) == (4, 2, 2)
    r = subprocess.run([*run, "--servers", "2"], capture_output=True, text=True)
    assert "2 servers, PP 2, TP 4 x DP 1" in r.stdout, r.stdout
    one = subprocess.run([*run, "--servers", "1"], capture_output=True, text=True)
    assert one.returncode == 3 and "refused" in one.stdout  # one such server does not hold it
