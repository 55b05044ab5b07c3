"""examples/: pinned specs for real deployments (issue #13). Each must load, and plan as its comment
says on the box it names, with the real model's facts (from its published config and files)."""

from dataclasses import replace

import pytest

from bundler import planner, spec
from bundler.modelinfo import ModelInfo
from bundler.probe import Gpu, Hardware
from tests.conftest import ROOT

GiB = 1 << 30
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

# the published models' shapes: config.json / GGUF metadata, and the files' sizes
QWEN7B_Q4 = ModelInfo(format="gguf", architecture="qwen2", file_size=4_683_073_536, layers=28, heads=28, kv_heads=4,
                      head_dim_k=128, head_dim_v=128, context_length=32768, has_chat_template=True)
NOMIC_EMBED_Q8 = ModelInfo(format="gguf", architecture="nomic-bert", file_size=146_146_432, layers=12, heads=12,
                           kv_heads=12, head_dim_k=64, head_dim_v=64, context_length=2048, pooling="mean")
LLAMA70B_AWQ = ModelInfo(format="safetensors", architecture="LlamaForCausalLM", file_size=39_772_421_632, layers=80,
                         heads=64, kv_heads=8, head_dim_k=128, head_dim_v=128, context_length=131072,
                         has_chat_template=True, quantization="awq", bits=4, group_size=128)
LLAMA8B_EXL2_4 = ModelInfo(format="exl2", architecture="LlamaForCausalLM", file_size=5_320_000_000, layers=32,
                           heads=32, kv_heads=8, head_dim_k=128, head_dim_v=128, context_length=131072,
                           has_chat_template=True, bits=4.0)
LLAMA8B_EXL3_4 = replace(LLAMA8B_EXL2_4, format="exl3")
FACTS = {"qwen2.5-7b-instruct": QWEN7B_Q4, "nomic-embed-text-v1.5": NOMIC_EMBED_Q8,
         "llama-3.1-70b-instruct": LLAMA70B_AWQ, "llama-3.1-8b-instruct": LLAMA8B_EXL2_4,
         "llama-3.1-8b-instruct-exl3": LLAMA8B_EXL3_4}


def _box(cpus: int, ram_gib: int, gpus: int = 0, mib: int = 0, cc: str = "8.9", links: str = "") -> Hardware:
    return Hardware(cpus=cpus, ram_total=ram_gib * GiB, ram_available=ram_gib * GiB, disk_free=500 * GiB,
                    disk_path="/", arch="x86_64", cpu_flags=("avx", "avx2", "fma", "f16c", "bmi2", "sse4_2"),
                    glibc="2.39", python="3.12.3", os="Ubuntu 24.04", systemd_pid1=True,
                    gpus=tuple(Gpu(i, "NVIDIA L4" if mib < 30000 else "NVIDIA A100", mib, mib, cc, "580.65.06")
                               for i in range(gpus)), gpu_links=links)


def _plans(s: spec.Spec, hw: Hardware) -> list[planner.Plan]:
    return planner.plan_models([(m.name, FACTS[m.name], m.task) for m in s.models], hw,
                               planner.Intent(s.service.concurrency, s.service.context),
                               engines_available=planner.ALL_ENGINES)


def test_every_example_is_here_and_loads():
    assert [p.name for p in EXAMPLES] == ["chat-and-embed.toml", "llama-3.1-70b-awq-4x24gb.toml",
                                          "llama-3.1-8b-instruct-exl2.toml", "llama-3.1-8b-instruct-exl3.toml",
                                          "qwen2.5-7b-instruct-gguf.toml"]
    for p in EXAMPLES:
        s = spec.load(p)
        assert all(m.is_repo and "@" in m.source for m in s.models)  # whole-repo sources, revision named


@pytest.mark.parametrize("hw, backend", [(_box(8, 32), "cpu"), (_box(16, 64, gpus=1, mib=23034), "cuda")])
def test_the_7b_instruct_gguf_runs_on_a_cpu_box_or_one_gpu(hw, backend):
    s = spec.load(ROOT / "examples" / "qwen2.5-7b-instruct-gguf.toml")
    [p] = _plans(s, hw)
    assert (p.engine, p.backend) == ("llama.cpp", backend)
    assert p.context_per_slot == 8192 and p.chat_template == ""  # the GGUF's own template
    if backend == "cuda":
        assert p.gpu_layers == p.total_layers  # the whole model on the one GPU


def test_the_70b_awq_takes_tensor_parallel_4_on_four_24gb_cards():
    s = spec.load(ROOT / "examples" / "llama-3.1-70b-awq-4x24gb.toml")
    assert s.vllm.version
    [p] = _plans(s, _box(32, 128, gpus=4, mib=24564, links="pcie"))
    assert (p.engine, p.tensor_parallel, p.data_parallel) == ("vllm", 4, 1)
    assert any("AWQ 4-bit, group size 128" in r for r in p.reasons)
    assert all(used <= usable for used, usable in zip(p.memory_per_gpu_gib, p.usable_per_gpu_gib))
    # the shortfall is said, not hidden (issue 24): not all 32 target requests fit at full length at once
    assert len(p.warnings) == 1 and f"of the {s.service.concurrency} target requests fit at full length" in \
        p.warnings[0], p.warnings
    assert p.warnings[0] in "\n".join(planner.explain(p, reasons=False))
    with pytest.raises(planner.PlanRefused):  # two of those cards do not hold it
        _plans(s, _box(32, 128, gpus=2, mib=24564, links="pcie"))


def test_chat_and_embed_share_one_box_and_one_key():
    s = spec.load(ROOT / "examples" / "chat-and-embed.toml")
    assert [(m.task, m.port) for m in s.models] == [("chat", 8080), ("embed", 8081)]
    chat, embed = _plans(s, _box(8, 32))
    assert (embed.engine, embed.task, embed.pooling, embed.threads) == ("llama.cpp", "embed", "", 2)  # its own pooling
    assert any("other models leave: nomic-embed-text-v1.5" in r for r in chat.reasons)


def test_the_exl2_example_plans_exllama_on_one_24gb_card_and_bundles_only_for_a_described_box(tmp_path):
    import subprocess
    import sys

    s = spec.load(ROOT / "examples" / "llama-3.1-8b-instruct-exl2.toml")
    assert s.models[0].source.endswith("@4.0bpw") and s.models[0].format == "exl2"
    [p] = _plans(s, _box(16, 64, gpus=1, mib=24564))
    assert (p.engine, p.tensor_parallel) == ("exllamav2", 1)
    assert len(p.warnings) == 1 and "one request at a time" in p.warnings[0]  # said, not silent (issue 24)
    # ExLlamaV2 is bundled for the box its probe file describes (its Python, torch, GPUs): without one,
    # refused before anything is fetched, saying what to run
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(ROOT / "examples" / s.path.split("/")[-1]),
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "needs the box's probe file" in r.stderr and "--probe" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


def test_the_exl3_example_batches_its_load_on_one_24gb_card():
    s = spec.load(ROOT / "examples" / "llama-3.1-8b-instruct-exl3.toml")
    assert s.models[0].source.endswith("@4.0bpw") and s.models[0].format == "exl3"
    [p] = _plans(s, _box(16, 64, gpus=1, mib=24564))
    # ExLlamaV3 batches: all 16 requests of the target load at once, unlike EXL2's one at a time
    assert (p.engine, p.tensor_parallel, p.slots) == ("exllamav3", 1, 16)
    assert not any("ONE request" in r for r in p.reasons) and p.warnings == ()
