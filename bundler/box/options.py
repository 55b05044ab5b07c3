"""install.sh's command line, parsed once into a frozen Options that every step reads."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import __version__
from ..contract import trust as policy

DEFAULT_PREFIX = policy.DEFAULT_PREFIX
DEFAULT_USER = "airgap-llm"


@dataclass(frozen=True)
class Options:
    bundle: Path
    action: str  # install | dry-run | probe | rollback | uninstall | list
    prefix: Optional[Path] = None
    config_dir: Optional[Path] = None
    host: Optional[str] = None
    port: Optional[int] = None
    concurrency: Optional[int] = None
    context: Optional[int] = None
    timeout: Optional[float] = None
    model_path: Optional[Path] = None
    base: Optional[Path] = None  # a delta bundle's base bundle folder, where the files it does not carry are
    model_facts: Optional[Path] = None
    box_file: Optional[Path] = None  # --dry-run for the box a probe file describes
    model_name: Optional[str] = None
    tensor_parallel: Optional[int] = None
    data_parallel: Optional[int] = None
    safe_all_reduce: bool = False
    bench: bool = False
    bench_max_tokens: int = 512
    bench_levels: tuple[int, ...] = ()  # () = 1 and the target concurrency
    tune: bool = False
    tune_budget: float = 1200.0  # seconds
    baseline: bool = False
    audit_egress: bool = False
    json: bool = False
    smoke: bool = True
    smoke_any_answer: bool = False
    trust: tuple[Path, ...] = ()
    allow_unsigned: bool = False
    allow_downgrade: bool = False
    yes: bool = False
    trust_fingerprint: Optional[str] = None
    purge: bool = False
    service: str = "auto"  # auto | systemd | process
    user: Optional[str] = None  # process mode as root: the account the engine runs as
    nodes: Optional[str] = None  # one service over several servers: their addresses, the head first
    node_rank: Optional[int] = None
    cluster_port: Optional[int] = None
    environ: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def parse_duration(text: str) -> float | None:
    """'900', '900s', '20m', '1h', '1.5h' → seconds; None if it is none of these."""
    text = text.strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], 0)
    try:
        value = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        return None
    return value if value > 0 else None


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="install.sh", allow_abbrev=False,  # bootstrap.py reads --prefix, --trust… by their full names
        description="Verify this bundle, plan the engine for this box, install it and start an "
                    "OpenAI-compatible service, then prove it answers. Never uses the network.",
        epilog="Environment: AIRGAP_LLM_PYTHON (python3 to use), AIRGAP_LLM_PREFIX (--prefix), "
               "AIRGAP_LLM_PORT (--port), AIRGAP_LLM_HOST (--host), AIRGAP_LLM_HEALTH_TIMEOUT (--timeout), "
               "AIRGAP_LLM_TRUST (--trust), AIRGAP_LLM_USER (--user). "
               "Exit status: 0 done, 1 error, 2 usage, 3 the model cannot be served on this box.")
    p.add_argument("--bundle", required=True, help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"airgap-llm installer {__version__}")
    p.add_argument("--prefix", default=env("AIRGAP_LLM_PREFIX"),
                   help=f"install under this directory (default {DEFAULT_PREFIX}, which needs root); several "
                        "bundles can live in one prefix, each under PREFIX/NAME")
    p.add_argument("--config-dir", default=None,
                   help="where the env file with the API key and the pinned keys go (default /etc/airgap-llm as "
                        "root, PREFIX/etc otherwise)")
    p.add_argument("--host", default=env("AIRGAP_LLM_HOST"), help="address to listen on (default: the bundle's, "
                   "usually 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("AIRGAP_LLM_PORT", "0")) or None,
                   help="port to listen on (default: the bundle's)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="the load to plan for: concurrent requests (default: the bundle's); it sizes slots, memory "
                        "and parallelism, and is not a cap where the engine can serve more")
    p.add_argument("--context", type=int, default=None, help="tokens per request (default: the bundle's)")
    p.add_argument("--timeout", type=float, default=float(env("AIRGAP_LLM_HEALTH_TIMEOUT", "0")) or None,
                   help="seconds to wait for the engine to become healthy (default 300; 900 for vLLM)")
    p.add_argument("--model", dest="model_path", default=None,
                   help="serve this model already on the box (a GGUF file or an HF model directory) instead of "
                        "the bundle's; it is not covered by the bundle's manifest")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="for a delta bundle (made with bundler bundle --base): the folder of the earlier bundle it "
                        "was made over, where the files it does not carry are taken from (each checked against "
                        "this bundle's signed manifest)")
    p.add_argument("--model-facts", default=None,
                   help="JSON from `bundler inspect` for a --model GGUF when the gguf package is not on the box")
    p.add_argument("--model-name", default=None, help="name clients use for --model (default: its file name)")
    p.add_argument("--tensor-parallel", type=int, default=None,
                   help="vLLM: override the planned tensor-parallel size (checked against the model's heads)")
    p.add_argument("--data-parallel", type=int, default=None, help="vLLM: override the planned data-parallel size")
    p.add_argument("--safe-all-reduce", action="store_true",
                   help="vLLM with tensor parallel: start with the custom all-reduce and its fusion off (the default "
                        "where NCCL_NVLS_ENABLE=0 or TORCH_SYMM_MEM_DISABLE_MULTICAST=1 says NVLink multicast is "
                        "off; elsewhere a crashed start is retried with them)")
    p.add_argument("--bench", action="store_true",
                   help="after the install, load-test the service at concurrency 1 and the planned slots")
    p.add_argument("--bench-max-tokens", type=int, default=512, help="output tokens per bench request (512)")
    p.add_argument("--bench-levels", default=None, metavar="N,N,...",
                   help="concurrency levels for --bench, --baseline and --tune (default: 1 and the target "
                        "concurrency)")
    p.add_argument("--audit-egress", action="store_true",
                   help="as root: run the install, start, smoke test and bench inside a network namespace whose only "
                        "way out is a dead end that records every connect and DNS lookup, from any process; fails "
                        "naming each address tried. The service runs as a process there and is stopped with it: "
                        "install again without this to serve")
    p.add_argument("--tune", action="store_true",
                   help="before installing, start the plan and its alternatives on this box one after another "
                        "(vLLM: tensor x data parallel splits, batch limits, API servers; llama.cpp: slots, unified "
                        "KV cache), bench each at 1 and the target concurrency, and install the fastest; the "
                        "engine with its own defaults is benched too, as the reference. The running release is "
                        "stopped meanwhile (one set of GPUs cannot hold two). Every candidate is printed and kept "
                        "in the release's tune.json")
    p.add_argument("--tune-budget", default="20m", metavar="TIME",
                   help="stop starting candidates once this much time is spent (e.g. 900s, 20m, 1h; default 20m); "
                        "the plan itself always runs")
    p.add_argument("--baseline", action="store_true",
                   help="with --bench: also bench the engine started with its own defaults (`vllm serve MODEL`, "
                        "`llama-server -m MODEL`) on the same port, then start the service again, and print "
                        "the plan's ratio to it")
    p.add_argument("--dry-run", action="store_true",
                   help="verify, probe, print the plan and the bundle's vulnerability report; change nothing")
    p.add_argument("--box", dest="box_file", default=None, metavar="PROBE.json",
                   help="with --dry-run: plan for the box this file describes (`./install.sh --probe` there) "
                        "instead of this one, e.g. before carrying the bundle to it")
    p.add_argument("--probe", action="store_true", help="print this box's facts as JSON and exit")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument("--no-smoke", action="store_true", help="skip the requests that prove the service answers")
    p.add_argument("--smoke-any-answer", action="store_true",
                   help="accept any text as the smoke test's answer (by default an instruction-tuned model must "
                        "answer 'What is the capital of France?' with Paris and a base model continue 'Monday, "
                        "Tuesday, Wednesday,' with Thursday): for test models with random weights")
    p.add_argument("--trust", action="append", default=[e for e in [env("AIRGAP_LLM_TRUST")] if e],
                   help="a signer's public key (minisign .pub) to trust; pinned under CONFIG/trusted.d once a bundle "
                        "it signed verifies (AIRGAP_LLM_TRUST)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="install a bundle without a valid signature from a pinned key (shouted, and recorded)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="install an older version than the last one accepted for this bundle name")
    p.add_argument("--yes", action="store_true",
                   help="answer yes to the questions install.sh asks; pinning a signer's key still needs "
                        "--trust KEY.pub or --trust-fingerprint (never the key the bundle carries on its own word)")
    p.add_argument("--trust-fingerprint", default=env("AIRGAP_LLM_TRUST_FINGERPRINT"), metavar="FP",
                   help="pin the key the bundle carries if its fingerprint is FP, as its maker told you out of band "
                        "(what `make bundle` printed: SHA256:… , the hash of the key itself)")
    p.add_argument("--rollback", action="store_true",
                   help="switch back to the release installed before the current one and start it")
    p.add_argument("--uninstall", action="store_true",
                   help="stop the service and remove what the installer made for this bundle: its releases, unit, "
                        "env file and logs (models are kept; directories that were there before are left)")
    p.add_argument("--list", action="store_true",
                   help="list every service installed in the prefix: state, model, engine, endpoint, release")
    p.add_argument("--purge", action="store_true",
                   help="with --uninstall: remove the stored models, pinned keys, accepted versions and the service "
                        "user the installer made too")
    p.add_argument("--service", choices=("auto", "systemd", "process"), default="auto",
                   help="systemd unit (where systemd is PID 1 and we are root) or a supervised background "
                        "process (default auto)")
    p.add_argument("--user", default=env("AIRGAP_LLM_USER"),
                   help=f"process mode as root: run the engine as this existing account (default: the system user "
                        f"{DEFAULT_USER!r}, made if missing). The engine never runs as root")
    c = p.add_argument_group("one service over several servers (vLLM's own multi-node)")
    c.add_argument("--nodes", default=None, metavar="ADDR,ADDR,...",
                   help="run the same command on every server, workers first: their IPv4 addresses on the private "
                        "network they share, the head (which serves the API) first. Each server finds its rank by "
                        "the address it holds; the head refuses to start until every worker answers as one of "
                        "this service. The engine's traffic between servers is unauthenticated: keep it on that "
                        "network (README: several servers)")
    c.add_argument("--node-rank", type=int, default=None,
                   help="this server's place in --nodes (0 = the head), where its address alone does not tell")
    c.add_argument("--cluster-port", type=int, default=None,
                   help="the head's rendezvous port for the engine (default 29501: vLLM's --master-port for a "
                        "pipeline over the servers, its --data-parallel-rpc-port for a replica on each); every server "
                        "also answers the others' checks on the next port. Open both between the servers only")
    return p


def parse(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Options:
    p = parser()
    a = p.parse_args(argv)
    if a.port is not None and not 1 <= a.port <= 65535:
        p.error(f"--port {a.port} is outside 1..65535")
    for opt in ("concurrency", "context", "tensor_parallel", "data_parallel"):
        v = getattr(a, opt)
        if v is not None and v < 1:
            p.error(f"--{opt.replace('_', '-')} must be at least 1, got {v}")
    levels: tuple[int, ...] = ()
    if a.bench_levels:
        try:
            levels = tuple(sorted({int(x) for x in a.bench_levels.split(",") if x.strip()}))
        except ValueError:
            p.error(f"--bench-levels {a.bench_levels!r}: give whole numbers separated by commas, e.g. 1,50,200")
        if not levels or levels[0] < 1:
            p.error(f"--bench-levels {a.bench_levels!r}: each level must be at least 1")
    budget = parse_duration(a.tune_budget)
    if budget is None:
        p.error(f"--tune-budget {a.tune_budget!r}: give a time such as 900s, 20m or 1h")
    if a.baseline and not a.bench:
        p.error("--baseline goes with --bench (it compares the installed service with the engine's defaults)")
    actions = [n for n in ("dry_run", "probe", "rollback", "uninstall", "list") if getattr(a, n)]
    if len(actions) > 1:
        p.error("choose one of " + ", ".join("--" + n.replace("_", "-") for n in actions))
    if a.box_file and not a.dry_run:
        p.error("--box goes with --dry-run (a plan for a described box; installing happens on the box itself)")
    if a.purge and not a.uninstall:
        p.error("--purge goes with --uninstall")
    if a.nodes is None and (a.node_rank is not None or a.cluster_port is not None):
        p.error("--node-rank and --cluster-port go with --nodes")
    if a.nodes is not None:
        clash = [o for o, on in (("--tune", a.tune), ("--baseline", a.baseline), ("--audit-egress", a.audit_egress),
                                 ("--box", a.box_file), ("--tensor-parallel", a.tensor_parallel is not None),
                                 ("--data-parallel", a.data_parallel is not None)) if on]
        if clash:
            p.error(f"{clash[0]} does not go with --nodes: it plans or measures one server (the plan over the "
                    "servers comes from bundler plan --servers N)")
    if a.user == "root":
        p.error("--user root: the engine never runs as root; name an unprivileged account")

    def path(v: str | None) -> Path | None:
        return Path(v).expanduser().absolute() if v else None

    return Options(
        bundle=Path(a.bundle).absolute(),
        action=actions[0].replace("_", "-") if actions else "install",
        prefix=path(a.prefix), config_dir=path(a.config_dir), host=a.host, port=a.port,
        concurrency=a.concurrency, context=a.context, timeout=a.timeout, model_path=path(a.model_path),
        base=path(a.base),
        model_facts=path(a.model_facts), box_file=path(a.box_file),
        model_name=a.model_name, tensor_parallel=a.tensor_parallel,
        data_parallel=a.data_parallel, safe_all_reduce=a.safe_all_reduce, bench=a.bench,
        bench_max_tokens=a.bench_max_tokens, bench_levels=levels, tune=a.tune, tune_budget=budget,
        baseline=a.baseline, audit_egress=a.audit_egress, json=a.json, smoke=not a.no_smoke,
        smoke_any_answer=a.smoke_any_answer,
        trust=tuple(Path(t).expanduser().absolute() for t in a.trust), allow_unsigned=a.allow_unsigned,
        allow_downgrade=a.allow_downgrade, yes=a.yes, purge=a.purge,
        trust_fingerprint=a.trust_fingerprint.strip() if a.trust_fingerprint else None,
        service=a.service, user=a.user, nodes=a.nodes, node_rank=a.node_rank, cluster_port=a.cluster_port,
        environ=dict(os.environ if environ is None else environ),
    )
