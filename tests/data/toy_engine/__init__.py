"""A toy engine, the engine registry's acceptance test: it serves a made-up format, "toy" (a JSON
file of {"words in a question": "its answer"}), through a standard-library HTTP server. It is one
package (this file, build.py, server.py) and one name in bundler/engines/__init__.py's PACKAGES;
tests/e2e/test_toy_engine.py copies it into a copy of the repository and bundles, installs, plans,
health-checks and benches it there.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import PlanRefused
from ...modelinfo import ModelInfo
from ...sizing import Plan
from ..base import Engine, Launch

NAME = "toy"


def facts(path) -> ModelInfo:
    answers = json.loads(Path(path).read_text())
    return ModelInfo(format="toy", architecture="toy", file_size=Path(path).stat().st_size, layers=len(answers),
                     heads=1, kv_heads=1, head_dim_k=1, head_dim_v=1, context_length=4096, has_chat_template=True)


def plan(name, info, hw, intent, task, offer) -> Plan:
    if NAME not in offer.engines:
        raise PlanRefused(f"{name} is a toy model but this bundle carries no toy engine", hint="bundle it")
    ctx = min(intent.context, info.context_length)
    return Plan(engine=NAME, backend="cpu", model=name, threads=1, slots=intent.concurrency, context_per_slot=ctx,
                gpu_layers=0, total_layers=info.layers, task=task,
                reasons=(f"the toy engine answers {intent.concurrency} requests at once from its file",))


def plan_cluster(name, info, nodes, intent) -> Plan:
    """Over several servers: every server holds a share of the answers' layers; the head answers."""
    ctx = min(intent.context, info.context_length)
    return Plan(engine=NAME, backend="cpu", model=name, threads=1, slots=intent.concurrency, context_per_slot=ctx,
                gpu_layers=0, total_layers=info.layers, task="chat", nodes=len(nodes), pipeline_parallel=len(nodes),
                reasons=(f"the toy engine over {len(nodes)} servers: the head answers once every worker is joined",))


def cluster(plan, rank, head, port, address, interface):
    return ["--cluster", str(rank), head, str(port), str(plan.nodes)], {"TOY_HOST_IP": address,
                                                                         "TOY_IFNAME": interface}


def launch(ctx) -> Launch:
    argv = [ctx.python, "-m", "bundler.engines.toy.server", ctx.model_path, ctx.name, ctx.host, str(ctx.port)]
    return Launch(argv, {"PYTHONPATH": str(ctx.final / "site")})


def summary(p) -> str:
    return f"{p.slots} requests at once"


ENGINE = Engine(NAME, "Toy", ("toy",), python=True, reference="`python -m bundler.engines.toy.server MODEL`",
                guarded=(("GET", "/v1/models"), ("POST", "/v1/completions")),
                launch=launch, facts=facts, plan=plan, summary=summary, plan_cluster=plan_cluster, cluster=cluster)
ENGINES = (ENGINE,)
