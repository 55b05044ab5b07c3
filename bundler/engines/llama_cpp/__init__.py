"""llama.cpp's own llama-server, box side: what it serves, its command line for a plan, and which CPU
build ggml loads on a box. The build (online) is engines/llama_cpp/build.py; nothing here imports it.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import BundlerError
from ..base import Engine, Launch

FORMATS = ("gguf",)
NAME = "llama.cpp"
CPU_GLIBC_TARGET = "2.28"


# No libcuda.so stub in a toolkit without a driver: build without CUDA virtual memory
# management (llama.cpp then uses its plain pool allocator; no need to link libcuda).
# Its CPU side (the layers a partial offload leaves on the CPU, sampling) is built for one level,
# named here rather than left to ggml's defaults (a SOURCE_DATE_EPOCH in the environment once
# turned every x86 option off): haswell, AVX2/FMA, which every CPU beside a CUDA 13 GPU has. The
# bundle records the flags, and the planner refuses the CUDA build on a CPU without them.
CUDA_CPU_LEVEL = "haswell"


def launch_argv(binary: str, model_path: str, alias: str, host: str, port: int, plan) -> list[str]:
    """llama-server's command line for a Plan. The API key comes from the
    environment (LLAMA_API_KEY), never the command line, so `ps` cannot show it."""
    if getattr(plan, "engine_defaults", False):  # `llama-server -m MODEL` by hand: a reference, never installed
        return [binary, "--model", model_path, "--alias", alias, "--host", host, "--port", str(port)]
    argv = [
        binary,
        "--model", model_path,
        "--alias", alias,
        "--host", host,
        "--port", str(port),
        "--parallel", str(plan.slots),
        "--ctx-size", str(plan.slots * plan.context_per_slot),
        "--threads", str(plan.threads),
        "--cont-batching",
        # one KV buffer for every slot, as llama-server does when it picks the slots itself (with it
        # the plan matched or beat llama-server's defaults at 1, 4 and 50: docs/BENCHMARKS.md)
        "--kv-unified",
        "--no-webui",
        "--offline",
        "--metrics",
    ]
    if plan.gpu_layers:
        # 999: every layer and the output tensors; a smaller number offloads that many layers
        ngl = 999 if plan.gpu_layers >= plan.total_layers else plan.gpu_layers
        argv += ["--n-gpu-layers", str(ngl)]
    if getattr(plan, "single_gpu", False):
        argv += ["--split-mode", "none", "--main-gpu", "0"]
    if plan.tensor_split:
        argv += ["--split-mode", "layer", "--tensor-split", ",".join(str(x) for x in plan.tensor_split)]
    if getattr(plan, "task", "chat") == "embed":
        # /v1/embeddings; one input is one batch, so a batch holds a whole input of the planned length
        argv += ["--embedding", "--batch-size", str(plan.context_per_slot), "--ubatch-size", str(plan.context_per_slot)]
        if plan.pooling:
            argv += ["--pooling", plan.pooling]
    if plan.chat_template:
        # a built-in template's name: with jinja on (llama-server's default) --chat-template takes a
        # jinja template, so "gemma" itself became the prompt and the model never saw the question
        argv += ["--no-jinja", "--chat-template", plan.chat_template]
    return argv + list(getattr(plan, "extra_args", ()))


# ---- which CPU backend ggml loads on a box -----------------------------------------------
# The x86 variants GGML_CPU_ALL_VARIANTS builds, with the /proc/cpuinfo flags each needs, and
# ggml's own score for each flag (ggml-cpu/arch/x86/cpu-feats.cpp): at start ggml loads the
# variant with the highest score whose every flag the CPU has. The probe records the flags,
# so the plan can say which one will run before anything is installed.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
CPU_VARIANTS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "skylakex": _HASWELL + _AVX512,
    "cannonlake": _HASWELL + _AVX512 + ("avx512vbmi",),
    "cascadelake": _HASWELL + _AVX512 + ("avx512_vnni",),
    "icelake": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni"),
    "cooperlake": _HASWELL + _AVX512 + ("avx512_vnni", "avx512_bf16"),
    "zen4": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": _HASWELL + ("avx_vnni",),
    "sapphirerapids": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}
_SCORE = {"fma": 1, "f16c": 2, "sse4_2": 4, "bmi2": 8, "avx": 16, "avx2": 32, "avx_vnni": 64, "avx512f": 128,
          "avx512vbmi": 256, "avx512_bf16": 512, "avx512_vnni": 1024, "amx_int8": 2048}


def best_cpu_variant(cpu_flags: tuple[str, ...], variants: tuple[str, ...]) -> str:
    """The CPU backend ggml will load on a CPU with these flags, of the variants bundled ("" if none runs)."""
    have = set(cpu_flags)
    best, best_score = "", 0
    for v in variants:
        need = CPU_VARIANTS.get(v)
        if need is None or not set(need) <= have:
            continue
        score = 1 + sum(_SCORE.get(f, 0) for f in need)
        if score > best_score:
            best, best_score = v, score
    return best


def launch(ctx) -> Launch:
    """llama-server from the bundle's build for the plan's backend, copied into the release once per build."""
    folder = ctx.engine_dir()
    # a CPU build carries one binary per instruction-set level: the one the plan chose for this CPU
    exe = f"llama-server-{ctx.plan.cpu_variant}" if ctx.plan.cpu_variant else "llama-server"
    if not (ctx.stage / folder / "bin" / exe).is_file():
        raise BundlerError(f"the bundle has no {exe} for the plan's CPU level", hint="bundle again")
    argv = launch_argv(str(ctx.final / folder / "bin" / exe), ctx.model_path, ctx.name, ctx.host, ctx.port, ctx.plan)
    level = next((r for r in ctx.plan.reasons if r.startswith("CPU backend")), "")
    return Launch(argv, lib_dirs=[str(ctx.final / folder / "lib"), *ctx.entry.get("box_lib_dirs", [])],
                  banner=f"airgap-llm: starting {exe}" + (f"; {level}" if level else ""))


def alternatives(plan, facts, hw, version: str = "") -> list[tuple[str, object, str]]:
    out = [("plan, KV per slot", replace(plan, extra_args=("--no-kv-unified",)),
            "a KV buffer per slot instead of one shared by all")]
    if plan.backend == "cpu":
        more = replace(plan, slots=plan.slots * 2)
        if lplan.ram_needed(facts, more.slots, plan.context_per_slot) <= hw.ram_available * lplan.RAM_FRACTION:
            out.append((f"{more.slots} slots", more, "twice the slots: larger batches per step"))
    return out


def summary(plan) -> str:
    gpu = f"{plan.gpu_layers}/{plan.total_layers} layers on GPU, " if plan.backend == "cuda" else ""
    return gpu + f"--parallel {plan.slots}, --ctx-size {plan.slots * plan.context_per_slot}"


from . import plan as lplan  # noqa: E402 - its planner needs the CPU levels above

ENGINE = Engine(NAME, "llama.cpp", FORMATS, reference="`llama-server -m MODEL`",
                # llama-server guards every route but /health itself
                guarded=(("GET", "/v1/models"), ("GET", "/props"), ("GET", "/slots"), ("GET", "/metrics"),
                         ("POST", "/completion"), ("POST", "/tokenize")),
                launch=launch, alternatives=alternatives, summary=summary, plan=lplan.plan, embeds=True,
                offered_as=("cpu", "cuda"))
ENGINES = (ENGINE,)
