from dataclasses import replace

import pytest

from bundler import planner
from bundler.engines import llama_cpp
from bundler.errors import PlanRefused
from bundler.modelinfo import ModelInfo
from bundler.probe import Gpu, Hardware

GiB = 1 << 30
GEMMA = ModelInfo(format="gguf", architecture="gemma3", file_size=253_113_024, layers=18, heads=4, kv_heads=1,
                  head_dim_k=256, head_dim_v=256, context_length=32768, sliding_window=512)
LLAMA8B_Q4 = ModelInfo(format="gguf", architecture="llama", file_size=int(4.9 * GiB), layers=32, heads=32,
                       kv_heads=8, head_dim_k=128, head_dim_v=128, context_length=131072, has_chat_template=True)


def box(cpus=2, ram_gib=23.0, gpus=(), flags=("avx", "avx2", "f16c", "fma")):
    return Hardware(cpus=cpus, ram_total=int(ram_gib * GiB), ram_available=int(ram_gib * GiB), disk_free=100 * GiB,
                    disk_path="/", arch="x86_64", cpu_flags=tuple(flags), glibc="2.36", python="3.11.7",
                    os="Debian", systemd_pid1=False, gpus=tuple(gpus))


def test_cpu_plan_sizes_slots_to_concurrency_and_uses_every_core():
    p = planner.plan("gemma", GEMMA, box(cpus=2), planner.Intent(concurrency=4, context=4096))
    assert (p.engine, p.backend, p.threads, p.slots, p.context_per_slot, p.gpu_layers) == ("llama.cpp", "cpu", 2, 4,
                                                                                          4096, 0)
    assert p.total_layers == 18
    assert p.ram_bytes < 0.85 * 23 * GiB
    assert any("vLLM" in r["why"] for r in p.rejected)


def test_kv_estimate_per_token_matches_the_layer_formula():
    # 18 layers × 1 KV head × (256 + 256) × 2 bytes = 18 KiB per token
    assert GEMMA.kv_bytes_per_token() == 18 * 1024
    assert LLAMA8B_Q4.kv_bytes_per_token() == 32 * 8 * 256 * 2  # 128 KiB


def test_context_is_lowered_to_fit_ram_and_the_plan_says_why():
    # 8B Q4 on an 8-core 12 GiB box: 16 slots × 8192 tokens of KV (16 GiB) cannot fit
    p = planner.plan("llama", LLAMA8B_Q4, box(cpus=8, ram_gib=12), planner.Intent(concurrency=16, context=8192))
    assert p.slots == 16
    assert p.context_per_slot < 8192
    assert p.ram_bytes <= 0.85 * 12 * GiB
    assert any("lowered from 8192" in r for r in p.reasons)


def test_slots_are_lowered_when_even_short_contexts_do_not_fit():
    p = planner.plan("llama", LLAMA8B_Q4, box(cpus=32, ram_gib=7), planner.Intent(concurrency=64, context=4096))
    assert p.context_per_slot == planner.MIN_CONTEXT
    assert 1 <= p.slots < 64
    assert p.ram_bytes <= 0.85 * 7 * GiB


def test_refusal_names_the_shortfall_in_gib():
    with pytest.raises(PlanRefused) as e:
        planner.plan("llama", LLAMA8B_Q4, box(ram_gib=4), planner.Intent(concurrency=1, context=2048))
    assert "does not fit in RAM" in e.value.message and "short by" in e.value.message
    assert e.value.exit_code == 3


@pytest.mark.parametrize("cpus,conc,slots", [(2, 50, 4), (2, 4, 4), (2, 1, 1), (16, 50, 32), (64, 50, 50)])
def test_cpu_slots_stop_where_the_cores_are_busy(cpus, conc, slots):
    """On 2 cores, 4 slots served 50 concurrent requests faster than 50 slots (issue #12): past 2 per
    core (4 at least) the rest wait in llama-server's queue, and the plan says so."""
    p = planner.plan("g", GEMMA, box(cpus=cpus), planner.Intent(concurrency=conc, context=4096))
    assert p.slots == slots
    assert any("wait in llama-server's queue" in r for r in p.reasons) == (slots < conc)


def test_context_is_capped_at_the_trained_context():
    small = ModelInfo(**{**GEMMA.to_dict(), "context_length": 2048})
    p = planner.plan("g", small, box(), planner.Intent(concurrency=1, context=8192))
    assert p.context_per_slot == 2048


def test_a_cpu_without_the_needed_instructions_is_refused():
    with pytest.raises(PlanRefused) as e:
        planner.plan("g", GEMMA, box(flags=("sse4_2",)), planner.Intent(1, 1024), cpu_flags_needed=("avx2",))
    assert "avx2" in e.value.message


def test_gpus_without_a_cuda_build_are_named_as_unused():
    gpu = Gpu(0, "NVIDIA H200", 143771, 143000, "9.0", "580.159.04")
    p = planner.plan("g", GEMMA, box(gpus=[gpu]), planner.Intent(4, 4096), engines_available=("cpu",))
    assert p.engine == "llama.cpp" and p.backend == "cpu"
    assert any("cuda" in r["engine"] and "CPU llama-server" in r["why"] for r in p.rejected)


def test_gemma_without_template_gets_the_builtin_gemma_template_in_argv():
    p = planner.plan("gemma", GEMMA, box(), planner.Intent(4, 4096))
    argv = llama_cpp.launch_argv("/x/llama-server", "/m.gguf", "gemma", "127.0.0.1", 8080, p)
    assert argv[argv.index("--chat-template") + 1] == "gemma"
    assert argv[argv.index("--parallel") + 1] == "4"
    assert argv[argv.index("--ctx-size") + 1] == str(4 * 4096)
    assert "--offline" in argv
    assert not any("key" in a.lower() for a in argv)  # the API key never appears on the command line
    p8 = planner.plan("llama", LLAMA8B_Q4, box(), planner.Intent(1, 1024))
    assert "--chat-template" not in llama_cpp.launch_argv("/x", "/m", "l", "127.0.0.1", 1, p8)


def _device_box(name: str) -> Hardware:
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "boxes" / name
    return Hardware.from_dict(json.loads(path.read_text()))


def _llama(layers: int, heads: int, size: int) -> ModelInfo:
    return ModelInfo(format="safetensors", architecture="LlamaForCausalLM", file_size=size, layers=layers, heads=heads,
                     kv_heads=8, head_dim_k=128, head_dim_v=128, context_length=8192, experts=0,
                     has_chat_template=True, bits=0.0)


@pytest.mark.parametrize("conc", [50, 200])
def test_the_measured_4xh200_box_gets_tensor_parallel_4_for_8b_and_70b(conc):
    """docs/BENCHMARKS.md (issue #6): on this box TP 4 beat TP 1 × DP 4 and TP 2 × DP 2 for the 8B shape,
    and TP 2 × DP 2 for the 70B shape, at 1, 50 and 200 concurrent requests."""
    hw = _device_box("device-h200x4-probe.json")
    assert len(hw.gpus) == 4 and hw.gpu_links == "nvlink"
    for info in (_llama(32, 32, 16_060_522_496), _llama(80, 64, 141_107_412_992)):
        p = planner.plan("m", info, hw, planner.Intent(concurrency=conc, context=4096),
                         engines_available=planner.ALL_ENGINES)
        assert (p.engine, p.tensor_parallel, p.data_parallel, p.slots) == ("vllm", 4, 1, conc)
        assert all(used <= usable for used, usable in zip(p.memory_per_gpu_gib, p.usable_per_gpu_gib))


def _qwen7b() -> ModelInfo:
    """The few-KV-head shape of issue #12: 28 layers, 28 heads, 4 KV heads, 15.2 GB in bf16."""
    return ModelInfo(format="safetensors", architecture="Qwen2ForCausalLM", file_size=15_231_233_024, layers=28,
                     heads=28, kv_heads=4, head_dim_k=128, head_dim_v=128, context_length=32768, experts=0,
                     has_chat_template=True, bits=0.0)


@pytest.mark.parametrize("conc,tp,dp", [(50, 2, 1), (200, 1, 2)])
def test_tensor_or_data_parallel_follows_the_load_measured_on_2xh200(conc, tp, dp):
    """Issue #12: for the 7B with 4 KV heads on 2×H200, TP 2 was faster at 50 requests (25 per GPU) and
    two data-parallel replicas at 200 (100 per GPU)."""
    hw = _device_box("device-h200x2-probe.json")
    p = planner.plan("m", _qwen7b(), hw, planner.Intent(concurrency=conc, context=4096),
                     engines_available=planner.ALL_ENGINES)
    assert (p.tensor_parallel, p.data_parallel) == (tp, dp)
    said = " ".join(p.reasons)
    assert ("widened to TP 2" in said) == (tp == 2) and ("not widened" in said) == (dp == 2)


@pytest.mark.parametrize("conc", [1, 50, 200, 1024])
def test_max_num_seqs_is_never_below_vllms_own_default_nor_the_load(conc):
    """The target load sizes the plan; it must not cap vLLM's batch below vLLM's own default (a cap
    of 50 left a batch of 50 outside the CUDA graphs: 0.55x of the defaults on one H200)."""
    hw = _device_box("device-h200x2-probe.json")
    p = planner.plan("m", _qwen7b(), hw, planner.Intent(concurrency=conc, context=4096),
                     engines_available=planner.ALL_ENGINES)
    per_replica = -(-conc // p.data_parallel)
    assert p.max_num_seqs == max(1024, per_replica)  # vLLM's default on a GPU of >= 70 GiB
    assert p.slots == conc
    graphs = min(2 * p.max_num_seqs, 512)
    assert per_replica > 512 or per_replica <= graphs, "the target batch runs inside the captured graphs"
    assert any(r.startswith(f"--max-num-seqs {p.max_num_seqs}: vLLM's own default") for r in p.reasons)


@pytest.mark.parametrize("cpus,conc,api", [(32, 50, 2), (32, 200, 0), (4, 50, 0)])
def test_a_second_api_server_where_the_cores_allow(cpus, conc, api):
    """One vLLM front-end process capped one H200 at ~11,000 tok/s at 200 streams, two served 17,028
    (issue #12, --tune on the box); data-parallel replicas get one each from vllm serve itself."""
    hw = replace(_device_box("device-h200x2-probe.json"), cpus=cpus)
    p = planner.plan("m", _qwen7b(), hw, planner.Intent(concurrency=conc, context=4096),
                     engines_available=planner.ALL_ENGINES)
    assert p.api_servers == api
    said = " ".join(p.reasons)
    assert ("--api-server-count 2" in said) == (api == 2)
    assert ("one per replica" in said) == (p.data_parallel > 1)


@pytest.mark.parametrize("name,mib,default", [("NVIDIA H100 80GB HBM3", 81559, 1024),
                                              ("NVIDIA A100-SXM4-80GB", 81920, 256),
                                              ("NVIDIA L40S", 46068, 256), ("NVIDIA H200", 143771, 1024)])
def test_vllm_default_max_num_seqs_follows_vllms_rule(name, mib, default):
    from bundler.probe import Gpu

    g = Gpu(index=0, name=name, memory_total_mib=mib, memory_free_mib=mib, compute_capability="9.0",
            driver="580.1")
    assert planner.vllm_default_max_num_seqs(g) == default
    assert planner.vllm_max_num_seqs(g, 8)[0] == default
    assert planner.vllm_max_num_seqs(g, 2000)[0] == 2000


def test_cpu_plan_names_the_instruction_set_variant_ggml_will_load():
    variants = tuple(llama_cpp.CPU_VARIANTS)
    haswell = box(flags=("avx", "avx2", "bmi2", "f16c", "fma", "sse4_2"))
    p = planner.plan("gemma", GEMMA, haswell, planner.Intent(concurrency=4, context=4096), cpu_variants=variants)
    assert p.cpu_variant == "haswell"
    assert any("CPU backend haswell (AVX2/FMA)" in r for r in p.reasons)
    old = box(flags=("sse4_2",))
    assert planner.plan("gemma", GEMMA, old, planner.Intent(4, 4096), cpu_variants=variants).cpu_variant == "sse42"
    with pytest.raises(PlanRefused, match="none of the bundled CPU backends"):
        planner.plan("gemma", GEMMA, old, planner.Intent(4, 4096), cpu_variants=("haswell", "skylakex"))


def test_the_cuda_build_is_refused_on_a_cpu_without_what_its_cpu_side_needs():
    """Issue #16: the CUDA llama-server's CPU side is built for AVX2/FMA; on an older CPU it would die
    of an illegal instruction, so the plan falls back to the CPU build's levels and says why."""
    from bundler.probe import Gpu

    gpu = Gpu(index=0, name="NVIDIA L4", memory_total_mib=23034, memory_free_mib=22000, compute_capability="8.9",
              driver="580.65")
    need = llama_cpp.CPU_VARIANTS[llama_cpp.CUDA_CPU_LEVEL]
    old = box(gpus=(gpu,), flags=("sse4_2", "avx"))
    p = planner.plan("gemma", GEMMA, old, planner.Intent(4, 4096), engines_available=("cpu", "cuda"),
                     cpu_variants=tuple(llama_cpp.CPU_VARIANTS), cuda_cpu_flags=need)
    assert (p.backend, p.cpu_variant) == ("cpu", "sandybridge")
    assert any("CPU side is built for AVX2/FMA" in r["why"] and "avx2" in r["why"] for r in p.rejected)
    new = box(gpus=(gpu,), flags=need)
    p = planner.plan("gemma", GEMMA, new, planner.Intent(4, 4096), engines_available=("cpu", "cuda"),
                     cpu_variants=tuple(llama_cpp.CPU_VARIANTS), cuda_cpu_flags=need)
    assert p.backend == "cuda" and any("AVX2/FMA code" in r for r in p.reasons)


@pytest.mark.parametrize("method,cc,ok", [("awq", "7.0", False), ("awq", "7.5", True), ("fp8", "7.5", False),
                                          ("fp8", "8.0", True), ("gptq", "7.0", True),
                                          ("compressed-tensors", "7.5", False)])
def test_a_quantization_the_gpus_cannot_run_is_refused_with_the_reason(method, cc, ok):
    from bundler.probe import Gpu

    q8b = replace(_llama(32, 32, int(5.7 * GiB)), quantization=method, bits=4.0 if method != "fp8" else 8.0,
                  group_size=128 if method != "fp8" else 0)
    gpu = Gpu(index=0, name="GPU", memory_total_mib=32768, memory_free_mib=32000, compute_capability=cc,
              driver="580.65")
    hw = box(cpus=16, gpus=(gpu,))
    if ok:
        p = planner.plan("q", q8b, hw, planner.Intent(8, 4096), engines_available=planner.ALL_ENGINES)
        assert p.engine == "vllm" and any(r.startswith(f"quantization {method.upper()}") for r in p.reasons)
    else:
        with pytest.raises(PlanRefused) as e:
            planner.plan("q", q8b, hw, planner.Intent(8, 4096), engines_available=planner.ALL_ENGINES)
        assert f"compute capability >= {planner.VLLM_QUANT_MIN_CC[method]}" in e.value.message and cc in e.value.message


def test_quantization_config_is_read_from_the_model_directory(tmp_path):
    import json

    from bundler.modelinfo import inspect_hf

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 8192, "vocab_size": 128256,
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    info = inspect_hf(tmp_path)
    assert (info.quantization, info.bits, info.group_size, info.format) == ("awq", 4.0, 128, "safetensors")
    for method in ("exl2", "exl3"):  # the ExLlama generation comes from quant_method
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": method, "bits": 4.25, "head_bits": 6}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        info = inspect_hf(tmp_path)
        assert (info.format, info.bits, info.quantization) == (method, 4.25, "")


# ---- several models in one bundle (issue #13) ----------------------------------------

BGE_M3 = ModelInfo(format="safetensors", architecture="XLMRobertaModel", file_size=2_271_000_000, layers=24, heads=16,
                   kv_heads=16, head_dim_k=64, head_dim_v=64, context_length=8192)


def test_an_embedding_model_on_the_cpu_takes_a_share_and_the_chat_model_plans_with_the_rest():
    hw = box(cpus=8, ram_gib=8.0)
    alone = planner.plan("chat", LLAMA8B_Q4, hw, planner.Intent(4, 4096))
    main, embed = planner.plan_models([("chat", LLAMA8B_Q4, "chat"), ("emb", GEMMA, "embed")], hw,
                                      planner.Intent(4, 4096))
    assert (embed.task, embed.engine, embed.backend, embed.threads, embed.pooling) == ("embed", "llama.cpp", "cpu", 2,
                                                                                       "mean")
    assert embed.context_per_slot == planner.EMBED_CONTEXT  # a chunk of a document, not the chat's 4096
    argv = llama_cpp.launch_argv("llama-server", "/m.gguf", "emb", "127.0.0.1", 8081, embed)
    assert argv[argv.index("--ubatch-size") + 1] == str(planner.EMBED_CONTEXT)  # one input fits one batch
    assert "--embedding" in argv and argv[argv.index("--pooling") + 1] == "mean" and "--chat-template" not in argv
    assert main.threads == 8 and main.task == "chat"
    # 8 GiB does not hold 4 × 4096 tokens of the 8B next to the embedding model: the chat plan shrinks, and says why
    assert main.context_per_slot < alone.context_per_slot or main.slots < alone.slots
    assert any("other models leave: emb (embed, llama.cpp cpu" in r for r in main.reasons)
    assert main.ram_bytes + embed.ram_bytes <= 0.85 * 8 * GiB


def test_a_gguf_that_names_its_pooling_keeps_it():
    p = planner.plan("e", replace(GEMMA, pooling="cls"), box(), planner.Intent(4, 512), task="embed")
    assert p.pooling == "" and "--pooling" not in llama_cpp.launch_argv("s", "/m", "e", "h", 1, p)


def test_a_vllm_embedding_model_gets_a_small_memory_share_and_the_chat_model_the_rest():
    from bundler.engines import vllm

    hw = _device_box("device-h200x2-probe.json")
    main, embed = planner.plan_models([("chat", _qwen7b(), "chat"), ("bge", BGE_M3, "embed")], hw,
                                      planner.Intent(50, 4096), engines_available=planner.ALL_ENGINES)
    assert (embed.engine, embed.tensor_parallel, embed.data_parallel) == ("vllm", 1, 1)
    assert 0.01 <= embed.gpu_memory_utilization <= 0.1
    assert main.gpu_memory_utilization == pytest.approx(planner.VLLM_UTILIZATION - embed.gpu_memory_utilization)
    argv = vllm.launch_argv("python", "/m", "bge", "127.0.0.1", 8081, embed, False)
    assert argv[argv.index("--runner") + 1] == "pooling"
    assert "--runner" not in vllm.launch_argv("python", "/m", "chat", "127.0.0.1", 8080, main, False)


def test_an_embedding_model_too_big_for_the_gpus_beside_the_chat_model_is_refused():
    hw = _device_box("device-h200x2-probe.json")
    huge = replace(BGE_M3, file_size=120 * GiB)
    with pytest.raises(PlanRefused) as e:
        planner.plan_models([("chat", _qwen7b(), "chat"), ("big", huge, "embed")], hw, planner.Intent(50, 4096),
                            engines_available=planner.ALL_ENGINES)
    assert "big" in e.value.message and "GGUF" in e.value.hint


# ---- EXL2 / EXL3 (issue #14): the generation from quant_method, one GPU / split / TP, batching ----

def _exl(fmt: str, layers: int, heads: int, gb: float, bits: float = 4.0) -> ModelInfo:
    return ModelInfo(format=fmt, architecture="LlamaForCausalLM", file_size=int(gb * 1e9), layers=layers,
                     heads=heads, kv_heads=8, head_dim_k=128, head_dim_v=128, context_length=131072,
                     has_chat_template=True, bits=bits)


def _cards(n: int, mib: int, name: str, cc: str, links: str) -> Hardware:
    return replace(box(cpus=32, ram_gib=256.0), gpus=tuple(Gpu(i, name, mib, mib, cc, "580.65.06") for i in range(n)),
                   gpu_links=links)


@pytest.mark.parametrize("fmt, size, hw, tp, split, slots, conc, ctx", [
    # an 8B at 4.0 bpw on one 24 GB card: one GPU; EXL2 one request at a time (no flash-attn to carry)
    ("exl2", (32, 32, 5.3), _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", ""), 1, 0, 1, 8, 8192),
    ("exl3", (32, 32, 5.3), _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", ""), 1, 0, 8, 8, 8192),
    # a 70B at 4.0 bpw (~36 GB) over two 24 GB PCIe cards: a GPU split (layers fill one GPU, then the next)
    ("exl2", (80, 64, 36.0), _cards(2, 24564, "NVIDIA GeForce RTX 4090", "8.9", "pcie"), 1, 2, 1, 4, 4096),
    ("exl3", (80, 64, 36.0), _cards(2, 24564, "NVIDIA GeForce RTX 4090", "8.9", "pcie"), 1, 2, 4, 4, 4096),
    # a 123B at 4.0 bpw (~62 GB) with KV for 8 × 8192 on four NVLinked H100s: tensor parallel 4
    ("exl3", (88, 96, 62.0), _cards(4, 81559, "NVIDIA H100 80GB HBM3", "9.0", "nvlink"), 4, 0, 8, 8, 8192),
    # the same 123B at 6.0 bpw (~92 GB) is more than one H100 holds: ExLlamaV2 tensor parallel 4 (one request)
    ("exl2", (88, 96, 92.0), _cards(4, 81559, "NVIDIA H100 80GB HBM3", "9.0", "nvlink"), 4, 0, 1, 8, 8192),
])
def test_exllama_table(fmt, size, hw, tp, split, slots, conc, ctx):
    p = planner.plan("m", _exl(fmt, *size), hw, planner.Intent(conc, ctx), engines_available=planner.ALL_ENGINES)
    assert (p.engine, p.tensor_parallel, len(p.gpu_split_gib), p.slots) == (f"exllamav{fmt[-1]}", tp, split, slots)
    assert all(used <= usable for used, usable in zip(p.memory_per_gpu_gib, p.usable_per_gpu_gib))
    other = "exllamav3" if fmt == "exl2" else "exllamav2"
    assert any(r["engine"] == other and "does not load" in r["why"] for r in p.rejected)
    one_at_a_time = [r for r in p.reasons if "ONE request at a time" in r]
    if fmt == "exl2":  # the plan says so, and what would serve the load instead
        assert one_at_a_time and "EXL3 build" in one_at_a_time[0] and "vLLM" in one_at_a_time[0]
    else:
        assert not one_at_a_time


def test_exl2_batches_where_the_bundle_carries_flash_attn():
    p = planner.plan("m", _exl("exl2", 32, 32, 5.3), _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", ""),
                     planner.Intent(8, 8192), engines_available=(*planner.ALL_ENGINES, "flash-attn"))
    assert p.slots == 8 and not any("ONE request" in r for r in p.reasons)


def test_exl3_needs_ampere_or_newer_and_the_engine_in_the_bundle():
    t4 = _cards(1, 15360, "Tesla T4", "7.5", "")
    with pytest.raises(PlanRefused) as e:
        planner.plan("m", _exl("exl3", 32, 32, 5.3), t4, planner.Intent(4, 4096), engines_available=planner.ALL_ENGINES)
    assert "7.5" in e.value.message
    with pytest.raises(PlanRefused):
        planner.plan("m", _exl("exl3", 32, 32, 5.3), _cards(1, 24564, "L4", "8.9", ""), planner.Intent(4, 4096),
                     engines_available=("cpu", "cuda", "vllm"))


@pytest.mark.parametrize("main", ["exl2", "gguf"])
def test_a_gpu_embedding_model_beside_an_exllama_or_cuda_llama_chat_model_leaves_it_less_gpu_memory(main):
    # the chat model's plan must see the GPU memory the vLLM embedding engine will hold: ExLlamaV2 and
    # the CUDA llama-server plan from the GPU's free memory, which had not been reduced for it
    hw = _cards(1, 24564, "NVIDIA GeForce RTX 4090", "8.9", "")
    chat = _exl("exl2", 32, 32, 5.3) if main == "exl2" else replace(LLAMA8B_Q4)
    alone = planner.plan("chat", chat, hw, planner.Intent(8, 8192), engines_available=planner.ALL_ENGINES)
    both, embed = planner.plan_models([("chat", chat, "chat"), ("bge", BGE_M3, "embed")], hw,
                                      planner.Intent(8, 8192), engines_available=planner.ALL_ENGINES)
    assert (embed.engine, embed.backend) == ("vllm", "cuda")
    taken = sum(embed.memory_per_gpu_gib)
    assert both.usable_per_gpu_gib[0] < alone.usable_per_gpu_gib[0] - taken * 0.9


@pytest.mark.parametrize("concurrency, context", [(0, 4096), (-5, 4096), (100000, 4096), (8, -1), (8, 0),
                                                  (8, 1 << 21), (True, 4096)])
def test_a_load_that_makes_no_sense_is_refused_with_the_range(concurrency, context):
    from bundler.errors import BundlerError

    with pytest.raises(BundlerError) as e:
        planner.Intent(concurrency=concurrency, context=context)
    assert "is outside" in e.value.message and "e.g." in e.value.hint
