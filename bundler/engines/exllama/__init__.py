"""ExLlama behind TabbyAPI, its own OpenAI-compatible server, on NVIDIA GPUs, in two generations:
ExLlamaV2 for EXL2 models (TabbyAPI's branch exl2-checkpoint: its main dropped EXL2) and ExLlamaV3
for EXL3 (TabbyAPI's main). The model's quant_method names the generation (GENS, by format).

Box side: the wheels go into PREFIX/engines like vLLM's; tabby_run.py starts TabbyAPI with the
config below and a key written at start into a private folder. The bundle side (the lock, the
extension built for the box, TabbyAPI's pinned archive) is engines/exllama/build.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import Engine
THIRD_PARTY = Path(__file__).resolve().parents[3] / "third_party"


@dataclass(frozen=True)
class Gen:
    """One ExLlama generation: its engine name (in plans and manifests, and TabbyAPI's `backend`), the
    model format it loads, its spec table, and the TabbyAPI commit that serves it (as `git archive
    --prefix=tabbyAPI-COMMIT7/` writes it; third_party/README.md says how to make it again)."""

    name: str
    label: str
    fmt: str
    spec_key: str
    version: str  # the release bundled unless the spec pins another
    tabby_commit: str
    tabby_sha256: str
    tabby_branch: str
    build_time: str  # of the extension on this 2-core machine, as measured
    triton: bool  # attends with Triton kernels, which compile a C launcher at first use (as vLLM's)

    @property
    def tabby_archive(self) -> Path:
        return THIRD_PARTY / f"tabbyAPI-{self.tabby_commit[:7]}.tar.gz"

    @property
    def ext_module(self) -> str:
        return f"{self.name}_ext"


V2 = Gen("exllamav2", "ExLlamaV2", "exl2", "exllama", "0.3.2",  # 0.3.2: the last release (EXL2 is frozen)
         "79126f904c2e00aece026b36bb70bbb87e4892b2",
         "1d3d83324ac115f815e9e0f53dc2ba1b7dfb6e3463b7b21bdb303ba29b4c0ca4", "exl2-checkpoint", "15–20 min",
         triton=False)


# 1.4.2: the release TabbyAPI's main pins (its own wheels are on GitHub only; PyPI has the sources)
V3 = Gen("exllamav3", "ExLlamaV3", "exl3", "exllamav3", "1.4.2",
         "e632af41eba68abeadc3437c62674360f2f8cbf1",
         "f0b6c886c85822d3045d709c47eec38c572dc7b5d2c561f8f0e0e572bb566041", "main", "about 21 min",
         triton=True)
GENS = {g.name: g for g in (V2, V3)}
# TabbyAPI's own auth guards its API routes; tabby_run.py's middleware adds /docs and /openapi.json
ENGINES = tuple(Engine(g.name, g.label, (g.fmt,), triton=g.triton, slow_start=True,
                       reference="TabbyAPI with only the model named in its config",
                       guarded=(("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/model/unload"),
                                ("POST", "/v1/model/load"), ("GET", "/openapi.json"), ("GET", "/docs")))
                for g in (V2, V3))
BY_FORMAT = {g.fmt: g for g in (V2, V3)}
FORMATS = tuple(BY_FORMAT)


def tabby_config(plan: Any, model_path: str, name: str, host: str, port: int) -> dict[str, Any]:
    """TabbyAPI's config for the plan (config_sample.yml names each key). JSON is YAML, so the file
    it reads is written with json; `airgap_llm` holds what tabby_run.py uses and removes."""
    model: dict[str, Any] = {
        "model_dir": "models", "model_name": name, "backend": plan.engine,
        "max_seq_len": plan.context_per_slot,
        # the KV cache holds every slot's context: TabbyAPI's cache_size is in tokens, all requests together
        # (ExLlama's cache is paged in 256 tokens: rounded up to whole pages)
        "cache_size": -(-plan.context_per_slot * max(1, plan.slots) // 256) * 256, "max_batch_size": max(1, plan.slots),
        "cache_mode": "FP16", "inline_model_loading": False, "use_dummy_models": False,
    }
    if plan.engine_defaults:  # what a user writes by hand: the model, nothing sized (--tune's reference)
        model = {k: model[k] for k in ("model_dir", "model_name", "backend")}
    elif plan.tensor_parallel > 1:
        model.update(tensor_parallel=True, tensor_parallel_backend="native", gpu_split_auto=True)
    elif plan.gpu_split_gib:
        model.update(gpu_split_auto=False, gpu_split=list(plan.gpu_split_gib))
    else:
        model.update(gpu_split_auto=True)
    return {
        # fetch requests: TabbyAPI downloads images named by URL in chat messages; never on an air-gapped box
        "network": {"host": host, "port": port, "disable_auth": False, "disable_fetch_requests": True,
                    "send_tracebacks": False, "api_servers": ["OAI"]},
        "logging": {"log_prompt": False, "log_generation_params": False, "log_requests": False},
        "model": model,
        "developer": {"unsafe_launch": False},
        "airgap_llm": {"model_path": model_path},
    }
