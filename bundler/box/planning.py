"""Step 4: which model, which engine and parameters for this box (the pure planner), the
operator's overrides, and the release id those decisions make."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .. import manifest as mf
from .. import engines, planner, probe
from ..errors import BundlerError, VerifyError
from ..modelinfo import ModelInfo
from .options import Options
from .report import info


def resolve_model(doc: dict[str, Any], opts: Options) -> dict[str, Any]:
    """The model to serve: the bundle's, or one already on the box (--model or a box: source)."""
    m = dict(doc["models"][0])
    if opts.model_path:
        path = opts.model_path
        m = {"name": opts.model_name or (path.name.rsplit(".", 1)[0] if path.is_file() else path.name),
             "file": str(path), "on_box": True, "sha256": "", "facts": None,
             "format": "safetensors" if path.is_dir() else "gguf", "source": f"box:{path}"}
    return _on_box(m, opts.model_facts)


def resolve_others(doc: dict[str, Any], opts: Options) -> list[dict[str, Any]]:
    """The bundle's other models (an embedding model beside the chat model), each with its port."""
    service_port = opts.port or doc["service"]["port"]
    out = []
    for i, raw in enumerate(doc["models"][1:], 1):
        m = _on_box(dict(raw), None)
        # a port moved with --port moves the others with it
        m["port"] = int(raw.get("port") or doc["service"]["port"] + i) - doc["service"]["port"] + service_port
        out.append(m)
    return out


def _on_box(m: dict[str, Any], facts_file: Path | None) -> dict[str, Any]:
    if not m.get("on_box"):
        return m
    path = Path(m["file"])
    if not path.exists():
        raise BundlerError(f"model {path} is not on this box", hint="copy it there, or pass --model PATH")
    if m["sha256"] and path.is_file():
        actual = mf.sha256_file(path)  # a box model can be many GB: hash it once
        if actual != m["sha256"]:
            raise VerifyError(f"{path}: sha256 mismatch: expected {m['sha256']}, got {actual}",
                              hint="copy the model again")
    from .. import modelinfo

    if facts_file:
        m["facts"] = json.loads(facts_file.read_text())
    elif path.is_dir():
        m["facts"] = modelinfo.inspect_hf(path).to_dict()
        m["format"] = m["facts"]["format"]
    else:
        try:
            m["facts"] = modelinfo.inspect_gguf(path).to_dict()
        except BundlerError as e:
            raise BundlerError(f"cannot read {path}'s GGUF header here ({e.message})",
                               hint="run `bundler inspect MODEL > facts.json` where the gguf package is, then pass "
                                    "--model-facts facts.json")
    info(f"model {m['name']}: {path} (on the box" + (", sha256 checked)" if m["sha256"] else ", not pinned)"))
    return m


def make_plan(doc: dict[str, Any], m: dict[str, Any], hw: probe.Hardware, opts: Options,
              others: list[dict[str, Any]] = ()) -> tuple[planner.Plan, list[planner.Plan]]:
    """The plan of the main model and of each other model, RAM and GPU memory budgeted across them."""
    service = doc["service"]
    intent = planner.Intent(concurrency=opts.concurrency or service["concurrency"],
                            context=opts.context or service["context"])
    flags: tuple[str, ...] = ()
    cuda_flags: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    available = []
    for e in doc["engines"]:
        if not engines.get(e["name"]).offered_as:
            available.append(e["name"])
            continue
        # offered by backend (llama.cpp): what each build needs of the CPU, and the CPU levels it carries
        available.append(e["backend"])
        if e["backend"] == "cpu":
            flags = tuple(e.get("cpu_flags", ()))
            variants = tuple(e.get("cpu_variants", ()))
        else:
            cuda_flags = tuple(e.get("cpu_flags", ()))
    plans = planner.plan_models([(x["name"], ModelInfo.from_dict(x["facts"]), x.get("task", "chat"))
                                 for x in [m, *others]], hw, intent,
                                engines_available=tuple(available), cpu_flags_needed=flags, cpu_variants=variants,
                                cuda_cpu_flags=cuda_flags)
    return override_parallel(plans[0], m, hw, opts), plans[1:]


def make_cluster_plan(doc: dict[str, Any], m: dict[str, Any], hw: probe.Hardware, opts: Options, servers: int,
                      others: list[dict[str, Any]] = ()) -> planner.Plan:
    """The plan of one model over `servers` servers like this one (each checks the others plan alike
    before the head starts: bundler/cluster_node.py)."""
    if others:
        raise BundlerError(f"--nodes serves one model; this bundle has {1 + len(others)} "
                           f"({', '.join([m['name'], *(o['name'] for o in others)])})",
                           hint="bundle the model to spread over the servers alone")
    info_ = ModelInfo.from_dict(m["facts"])
    engine = engines.for_format(info_.format)
    if engine is None or engine.plan_cluster is None:
        can = [e.label for e in engines.registry().values() if e.plan_cluster]
        raise BundlerError(f"{m['name']} is {info_.format}, and {engine.label if engine else 'no engine'} serves one "
                           f"server only; across servers: {', '.join(can) or 'none'}",
                           hint="leave --nodes out, or bundle a model of a format that can be spread")
    if engine.name not in {e["name"] for e in doc["engines"]}:
        raise BundlerError(f"this bundle carries no {engine.label}, which --nodes needs for {m['name']}",
                           hint="bundle it with that engine")
    service = doc["service"]
    intent = planner.Intent(concurrency=opts.concurrency or service["concurrency"],
                            context=opts.context or service["context"])
    return engine.plan_cluster(m["name"], info_, [hw] * servers, intent)


def override_parallel(plan: planner.Plan, m: dict[str, Any], hw: probe.Hardware, opts: Options) -> planner.Plan:
    """--tensor-parallel / --data-parallel replace the planner's choice, within what fits, as the
    engine allows (vLLM: any split that fits; ExLlama: tensor parallel over every GPU or none)."""
    if opts.tensor_parallel is None and opts.data_parallel is None:
        return plan
    engine = engines.get(plan.engine)
    if engine.override is None:
        raise BundlerError(f"--tensor-parallel/--data-parallel do not apply to {engine.label}, which this plan uses",
                           hint="drop the option")
    facts = ModelInfo.from_dict(m["facts"]) if m.get("facts") else None
    return engine.override(plan, facts, hw, opts.tensor_parallel, opts.data_parallel)


def print_plan(plan: planner.Plan, hw: probe.Hardware, others: list[planner.Plan] = (),
               ports: list[int] = ()) -> None:
    info(f"box: {hw.cpus} CPUs, {hw.ram_available / 2**30:.1f} GiB RAM available, "
         f"{len(hw.gpus)} GPU(s), glibc {hw.glibc}, Python {hw.python}, {hw.os}")
    for p, port in [(plan, 0), *zip(others, ports)]:
        head = f"plan for {p.model} ({p.task}" + (f", port {port})" if port else ")") if others else "plan"
        info(f"{head}: {p.engine} ({p.backend}), {p.threads} threads, {p.slots} slots × {p.context_per_slot} tokens")
        for line in planner.explain(p):
            info(line)


def release_id(manifest_sha: str, model_file: str, plan: planner.Plan, host: str, port: int, mode: str,
               user: str, others: list[tuple[planner.Plan, int]] = (), cluster: Any = None) -> str:
    """The same bundle, model, decisions, address and service mode make the same release."""
    h = hashlib.sha256((manifest_sha + model_file).encode())

    def decided(p: planner.Plan) -> dict[str, Any]:  # the reasons quote free RAM, which moves between runs
        return {k: v for k, v in p.to_dict().items() if k not in ("reasons", "rejected", "ram_bytes", "warnings")}

    h.update(json.dumps([decided(plan), host, port, mode, user], sort_keys=True).encode())
    if others:
        h.update(json.dumps([[decided(p), pt] for p, pt in others], sort_keys=True).encode())
    if cluster is not None:  # the same bundle on another server of the cluster, or another cluster, is another release
        h.update(json.dumps([list(cluster.nodes), cluster.rank, cluster.port]).encode())
    return h.hexdigest()[:12]
