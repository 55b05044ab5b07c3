"""What the box side asks of an engine, as data: core and box code read these capabilities and never
compare engine names for them. Each engine package defines its own (ENGINE, or one per generation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Every Python engine loads its model from a folder, never a hub: Hugging Face's libraries offline, no telemetry
HUB_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "DO_NOT_TRACK": "1"}


@dataclass(frozen=True)
class Engine:
    name: str  # in plans, manifests and the spec
    label: str  # for people
    formats: tuple[str, ...]  # model formats it serves
    triton: bool = False  # its kernels are Triton's: they compile a C launcher at first use (a C compiler, headers)
    slow_start: bool = False  # compiles kernels or loads layer by layer at its first start: 900 s to be healthy
    fatal_log: tuple[str, ...] = ()  # log lines after which it never becomes healthy (seen at once, not at timeout)
    guarded: tuple[tuple[str, str], ...] = ()  # routes that must refuse a request without the key (smoke test)
    serial_start: bool = False  # sizes its cache from the memory it sees used while starting: start it alone
    tp_retry: bool = False  # a crashed tensor-parallel start is retried once with the safe all-reduce flags
    reference: str = ""  # how a user starts it by hand: --tune's and --baseline's reference
    offered_as: tuple[str, ...] = ()  # its builds are offered to the planner by backend, under these names
    embeds: bool = False  # serves /v1/embeddings for an embedding model of its formats
    gpu_share: float = 0.0  # sizes itself to this share of each GPU's total memory (the others' come off it)
    python: bool = False  # runs on the installer's python (the engine's account must be able to start it)
    flashinfer: bool = False  # samples with FlashInfer kernels that nvcc compiles at its first start
    # box side, as functions of the engine's package (None: the engine has no such step):
    #   launch(ctx) -> Launch: its start for one model; ctx is the release being written (box/release.py's
    #       LaunchContext: the plan, model path, address, the engine's manifest entry and the release's helpers)
    #   alternatives(plan, facts, hw, version) -> [(label, plan, why)]: what --tune starts beside the plan
    #   override(plan, facts, hw, tp, dp) -> plan: --tensor-parallel/--data-parallel applied, or BundlerError
    #   summary(plan) -> str: its sizing in a few words, with its own flags' names
    #   plan(name, info, hw, intent, task, offer) -> Plan: its plan for a model of its formats on that box
    #       (engines/NAME/plan.py; offer: what the bundle carries, bundler/sizing.py)
    # and, to serve one model over several servers (install.sh --nodes):
    #   plan_cluster(name, info, nodes, intent) -> Plan: the plan over those servers (each's probe), or PlanRefused
    #   cluster(plan, rank, head, port, address, interface) -> (argv, env): what server `rank` adds to its start
    # and, for a format of its own that is one file:
    #   facts(path) -> ModelInfo: what planning needs of a model file (the bundle records it)
    launch: Callable[[Any], Launch] | None = None
    alternatives: Callable[..., list[tuple[str, Any, str]]] | None = None
    override: Callable[..., Any] | None = None
    summary: Callable[[Any], str] | None = None
    facts: Callable[[Any], Any] | None = None
    plan: Callable[..., Any] | None = None
    plan_cluster: Callable[..., Any] | None = None
    cluster: Callable[..., tuple[list[str], dict[str, str]]] | None = None


@dataclass(frozen=True)
class Launch:
    """An engine's start for one model, as the release's launch script runs it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set for the engine (the key comes from the env file)
    cache_vars: dict[str, str] = field(default_factory=dict)  # variable → its folder under the box's engine cache
    lib_dirs: list[str] = field(default_factory=list)  # LD_LIBRARY_PATH
    banner: str = ""  # printed to the log at each start
