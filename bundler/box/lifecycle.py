"""The flows: install (first install or upgrade), rollback, uninstall. Each reads as its steps,
like the last lines of an install script; the steps live in their own modules."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import planner, probe
from .. import engines
from ..engines import vllm
from ..errors import BundlerError
from ..modelinfo import ModelInfo
from . import layout as lay
from . import cluster as clusters
from . import listener, tune
from .health import LogWatch, http_json, smoke, smoke_embed, wait_healthy
from .layout import Layout, PrefixLock, check_layout_owned, layout_for, make_dirs, record_made
from .options import Options
from .planning import make_cluster_plan, make_plan, print_plan, release_id, resolve_model, resolve_others
from .preflight import (TRITON_ENGINES, check_port, check_readable_by_engine, check_runnable_by_engine, preflight,
                        triton_toolchain)
from .release import Member, Target, build_release, local_address, read_target
from .report import info, warn
from .service import (check_reachable, ctl, engine_alive, engine_user, ensure_env_file, ensure_user, give_to_user,
                      is_running, read_key, remove_unit, remove_user, service_mode, start, state, stop_command)
from .service import RUNNING
from .trust import check_trust, remember
from .verify import join_split_files, verify_bundle


@dataclass(frozen=True)
class Service:
    target: Target
    timeout: float  # seconds to wait for health
    extra: tuple[Member, ...] = ()  # the bundle's other models, each its own engine and port
    cluster: clusters.Cluster | None = None  # one service over several servers: this one's place
    facts: dict[str, Any] | None = None  # what this server answers its peers with (cluster_node.py)

    @property
    def worker(self) -> bool:
        """A server of a cluster that runs the engine headless: no API of its own, no key sent to it."""
        return self.cluster is not None and self.cluster.rank > 0

    @property
    def base(self) -> str:
        return f"http://{local_address(self.target.host)}:{self.target.port}"

    def base_of(self, port: int) -> str:
        return f"http://{local_address(self.target.host)}:{port}"


# ---- install -------------------------------------------------------------------------

def install(opts: Options) -> dict[str, Any] | None:
    dry = opts.action == "dry-run"
    doc, data = verify_bundle(opts.bundle, opts.base, dry)
    layout = layout_for(opts, doc["name"])
    check_layout_owned(layout)
    opts = inherit_options(opts, layout)
    if not opts.box_file:  # a plan for a described box installs nothing here
        lay.check_writable(layout.prefix, "--prefix")
        lay.check_writable(layout.etc, "the config folder")
    cluster = clusters.resolve(opts.nodes, opts.node_rank, opts.cluster_port) if opts.nodes else None
    trust = check_trust(opts.bundle, doc, layout, opts, data, *_staged_trust(opts.bundle))
    hw = described_box(opts.box_file) if opts.box_file else probe.probe(layout.prefix)
    preflight(doc, hw, layout)
    m = resolve_model(doc, opts)
    others = resolve_others(doc, opts)
    if cluster:
        info(f"cluster: this server is the {cluster.role} of {len(cluster.nodes)} ({cluster.address} on "
             f"{cluster.interface}); the engine's traffic between servers stays on that interface")
        if note := clusters.hosts_note(cluster):
            info(note)
        plan, oplans = make_cluster_plan(doc, m, hw, opts, len(cluster.nodes), others), []
    else:
        plan, oplans = make_plan(doc, m, hw, opts, others)
    print_plan(plan, hw, oplans, [o["port"] for o in others])
    for e in doc["engines"]:  # which release of an engine, where the bundle chose it (vLLM's "latest")
        if e.get("why") and e["name"] in {p.engine for p in [plan, *oplans]}:
            info(f"{engines.get(e['name']).label}: {e['why']}")
    for name in sorted({p.engine for p in [plan, *oplans]} & set(TRITON_ENGINES)):
        if not opts.box_file:
            triton_toolchain(doc, name)
    mode = service_mode(opts, hw)
    target = Target(opts.host or doc["service"]["host"], opts.port or doc["service"]["port"], mode,
                    engine_user(opts, mode))
    extra = tuple(Member(o, p, o["port"]) for o, p in zip(others, oplans))
    # vLLM compiles kernels at its first start; TabbyAPI loads a large model layer by layer
    slow = any(engines.get(p.engine).slow_start for p in [plan, *oplans])
    facts = clusters.facts(cluster, hashlib.sha256(data).hexdigest(), m, plan, hw, "") if cluster else None
    svc = Service(target, opts.timeout or (900.0 if slow else 300.0), extra, cluster, facts)
    if target.user:
        check_reachable(layout.prefix, target.user)
    for mm in [m, *others]:
        if mm.get("on_box"):
            check_readable_by_engine(Path(mm["file"]), target.user, mode)
    if cluster or any(engines.get(p.engine).python for p in [plan, *oplans]):  # cluster_node runs on it too
        check_runnable_by_engine(sys.executable, target.user, mode)
    if dry:
        report = _say_vulnerabilities(opts.bundle, doc)
        info(f"dry run: would install release under {layout.releases}, env file {layout.env_file}, service as "
             f"{mode}{' (engine as user ' + target.user + ')' if target.user else ''}, listening on "
             f"{target.host}:{target.port}; nothing was changed")
        if opts.json:
            print(json.dumps({"dry_run": True, "plan": plan.to_dict(), "box": hw.to_dict(), "vulnerabilities": report,
                              "others": [{"model": x.m["name"], "task": x.plan.task, "port": x.port,
                                          "plan": x.plan.to_dict()} for x in extra],
                              "prefix": str(layout.prefix), "service": mode, "user": target.user}, indent=2))
        return None
    previous = _current_release(layout)
    serving = previous is not None and is_running(previous)
    for port in [] if svc.worker else [target.port, *(x.port for x in extra)]:
        check_port(target.host, port, serving)
    if cluster:
        if not serving:
            clusters.check_ports_free(cluster)
        clusters.check_workers(cluster, facts)  # the head: every worker answers as one of this service
    join_split_files(opts.bundle, doc)
    made_prefix = make_dirs(layout.prefix)
    with PrefixLock(layout.prefix):
        record_made(layout, made_prefix)
        return _install_locked(opts, doc, data, layout, trust, m, plan, svc, hw)


def inherit_options(opts: Options, layout: Layout) -> Options:
    """Running the installer again without the options of the installed release kept them (re-planning
    silently on port 8080 and another account was the surprise): the installed release's address, port,
    service kind and engine account are the defaults, and what is taken or changed is said."""
    import dataclasses

    current = _current_release(layout)
    if current is None or opts.box_file:
        return opts
    try:
        t = read_target(current)
    except (OSError, ValueError, TypeError):
        return opts
    given = {"host": opts.host, "port": opts.port, "user": opts.user,
             "service": None if opts.service == "auto" else opts.service, "nodes": opts.nodes}
    was = {"host": t.host, "port": t.port, "user": t.user or None, "service": t.mode, "nodes": None}
    c, _ = _cluster_of(current)  # one server of several stays one, where --nodes is not given again
    if c is not None:
        was["nodes"] = ",".join(c.nodes)
        if opts.nodes is None:
            given.update(node_rank=None, cluster_port=None)
            was.update(node_rank=c.rank, cluster_port=c.port)
    taken, changed = {}, []
    for k, v in given.items():
        if v is None and was[k] is not None:
            taken[k] = was[k]
        elif v is not None and was[k] is not None and v != was[k]:
            changed.append(f"--{k} {v} (was {was[k]})")
    if taken:
        info("as installed (release " + current.name + "): " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                          for k, v in taken.items())
             + "; pass the option to change it")
    if changed:
        info("changing the installed release's " + ", ".join(changed))
    return dataclasses.replace(opts, **taken)


SAFE_SUFFIX = "-safe"  # a vLLM release retried with the safe all-reduce flags: the same release otherwise


def release_name(rid: str, safe: bool) -> str:
    return rid + (SAFE_SUFFIX if safe else "")


def same_release(installed: str, rid: str) -> bool:
    """Whether the installed release (by folder name) is what this bundle and plan make (`rid`)."""
    return installed == rid or installed == release_name(rid, True)


def _staged_trust(bundle: Path) -> tuple[bytes | None, str]:
    """The signature and signer.pub as bootstrap.py read them (once), for the same decision."""
    from . import boot

    offered = boot.read(bundle, "signer.pub", 4096)
    return boot.read(bundle, "manifest.json.minisig", 4096), offered.decode("utf-8", "replace") if offered else ""


def described_box(path: Path) -> probe.Hardware:
    """The box a probe file (`./install.sh --probe` there) describes, for --dry-run --box."""
    try:
        hw = probe.Hardware.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise BundlerError(f"--box {path}: no such file",
                           hint="make it on the box with ./install.sh --probe > box.json")
    except (ValueError, TypeError, KeyError) as e:
        raise BundlerError(f"--box {path}: not a probe file ({e})", hint="make it with ./install.sh --probe > box.json")
    info(f"planning for the box {path} describes ({len(hw.gpus)} GPU(s), {hw.cpus} CPUs), not this one; the "
         "C compiler and headers Triton needs (vLLM, ExLlamaV3) are checked on the box itself")
    return hw


def _runner(opts: Options, doc: dict[str, Any], data: bytes, layout: Layout, m: dict[str, Any], svc: Service,
            key: str, levels: tuple[int, ...]) -> tune.Runner:
    t = svc.target
    safe = opts.safe_all_reduce or vllm.multicast_off(opts.environ)
    return tune.Runner(build=lambda p, rid: build_release(opts.bundle, doc, data, m, p, layout, rid, t, safe=safe,
                                                          extra=svc.extra),
                       layout=layout, mode=t.mode, base=svc.base, key=key, model=m["name"], timeout=svc.timeout,
                       levels=levels, max_tokens=opts.bench_max_tokens)


def _levels(opts: Options, plan: planner.Plan) -> tuple[int, ...]:
    return opts.bench_levels or tuple(sorted({1, plan.slots}))


def undo_action(previous: bool, stopped: bool, mode: str) -> str:
    """What putting the box back takes when an install fails: 'restart' the previous release that this
    install stopped, 'remove-unit' a first systemd install left (no unit behind a failure), or 'nothing'."""
    if previous and stopped:
        return "restart"
    if mode == "systemd":
        return "remove-unit"
    return "nothing"


class Transaction:
    """One install's changes to what serves: it stops the previous release (arming the detached guard
    first where a new release will replace it, so that a killed installer still brings it back), and on
    any failure puts the box back as it was (undo_action); commit() switches `current`."""

    def __init__(self, layout: Layout, mode: str, previous: Path | None):
        self.layout, self.mode, self.previous = layout, mode, previous
        self.stopped = False
        self.done: Path | None = None  # the guard's marker: touched once there is nothing left to undo

    def stop_previous(self, why: str, replacement: Path | None = None) -> None:
        """Stop the previous release if it serves; with a replacement to start, arm the guard first (also
        when an earlier step, --tune, already stopped it)."""
        if self.previous is None:
            return
        running = not self.stopped and is_running(self.previous)
        if replacement is not None and self.done is None and (self.stopped or running):
            self._guard(replacement)
        if running:
            info(why.format(name=self.previous.name))
            ctl(self.previous, "stop")
            self.stopped = True

    def _guard(self, replacement: Path) -> None:
        """Detached: if this installer dies before commit or undo, start the previous release again and
        remove the half-started replacement."""
        assert self.previous is not None
        self.done = self.layout.home / f".upgrade-{os.getpid()}.done"  # read (and removed) by the guard only
        subprocess.Popen([sys.executable, "-S", "-m", "bundler.guard", "--pid", str(os.getpid()), "--done",
                          str(self.done), "--ctl", str(self.previous / "bin" / "ctl"), "--remove", str(replacement)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, cwd="/")

    def undo(self) -> None:
        action = undo_action(self.previous is not None, self.stopped, self.mode)
        if action == "restart":
            assert self.previous is not None
            warn(f"restarting the previous release {self.previous.name}")
            start(self.previous, read_target(self.previous).mode, self.layout)
        elif action == "remove-unit":
            remove_unit(self.layout)  # a first install that failed leaves no unit behind
        self._release_guard()

    def commit(self, release: Path) -> None:
        self._release_guard()  # healthy and answering: from here on the guard must not undo it
        switch_current(self.layout, release)

    def _release_guard(self) -> None:
        if self.done is not None:
            self.done.touch()


def _install_locked(opts: Options, doc: dict[str, Any], data: bytes, layout: Layout, trust: dict[str, Any],
                    m: dict[str, Any], plan: planner.Plan, svc: Service, hw: probe.Hardware) -> dict[str, Any]:
    t = svc.target
    tx = Transaction(layout, t.mode, _current_release(layout))
    tuned: dict[str, Any] | None = None
    if opts.tune:
        key = _prepare(layout, t)
        tx.stop_previous("--tune: stopping the running release {name} while the candidates run (one set of GPUs or "
                         "RAM cannot hold two); the chosen one is installed and started afterwards")
        try:
            version = next((e.get("version", "") for e in doc["engines"] if e["name"] == plan.engine), "")
            plan, tuned = tune.tune(_runner(opts, doc, data, layout, m, svc, key, _levels(opts, plan)),
                                    tune.candidates(plan, ModelInfo.from_dict(m["facts"]), hw, version),
                                    opts.tune_budget, plan.slots)
        except BaseException:
            tx.undo()
            raise
    rid = release_id(hashlib.sha256(data).hexdigest(), m["file"], plan, t.host, t.port, t.mode, t.user,
                     [(x.plan, x.port) for x in svc.extra], svc.cluster)
    if tx.previous is not None and same_release(tx.previous.name, rid):
        result = _same_release(tx.previous, layout, doc, m, plan, svc, opts)
        return _after(opts, doc, data, layout, m, plan, svc, result, tuned)
    key = _prepare(layout, t)
    # if this process dies from here on, the guard brings the previous release back
    tx.stop_previous("stopping the previous release {name} (one set of GPUs or RAM cannot hold both)",
                     replacement=layout.releases / rid)
    try:
        release, answer, t0 = _start_new_release(opts, doc, data, m, plan, layout, rid, svc, key)
    except BaseException:
        tx.undo()
        raise
    tx.commit(release)
    remember(layout, doc["name"], trust)
    info(f"first answer {time.monotonic() - t0:.1f}s after start")
    result = summary(layout, doc, m, plan, t, answer, changed=True, extra=svc.extra, cluster=svc.cluster)
    return _after(opts, doc, data, layout, m, plan, svc, result, tuned)


def _after(opts: Options, doc: dict[str, Any], data: bytes, layout: Layout, m: dict[str, Any], plan: planner.Plan,
           svc: Service, result: dict[str, Any], tuned: dict[str, Any] | None) -> dict[str, Any]:
    """The installed service is up: keep what --tune found in the release, then --bench (and
    --baseline) against it."""
    release = layout.current.resolve()
    if tuned is not None:
        (release / "tune.json").write_text(json.dumps(tuned, indent=2) + "\n")
        if tune.write_plot(tuned, release / "tune.png"):
            info(f"tune plot: {release / 'tune.png'}")
        info(f"every candidate: {release / 'tune.json'}")
        result["tune"] = tuned
    if not opts.bench:
        return result
    if svc.worker:
        info("--bench: a worker serves no API of its own; bench the head")
        return result
    from .. import bench

    key = read_key(layout)
    levels = _levels(opts, plan)
    report = bench.sweep(svc.base + "/v1", key, m["name"], list(levels), None, tune.PROMPT_TOKENS,
                         opts.bench_max_tokens, min_requests=tune.MIN_REQUESTS,
                         before_level=lambda _c: listener.require_ours(layout, svc.target.mode, [svc.target.port]))
    info(bench.table(report))
    result["bench"] = report
    if opts.baseline:
        t = svc.target
        info(f"--baseline: stopping {release.name} to bench the engine with its own defaults on the same port")
        ctl(release, "stop")
        try:
            ref = tune.reference(plan)
            row = _runner(opts, doc, data, layout, m, svc, key, levels).run(ref, 0)
        finally:
            info(f"starting {release.name} again")
            start(release, t.mode, layout)
            wait_healthy(svc.base, svc.timeout, layout.log_hint(t.mode), lambda: engine_alive(release, layout, t.mode))
        if row["error"]:
            raise BundlerError(f"the engine with its own defaults ({ref.why}) did not serve: {row['error']}",
                               hint=f"see {layout.log_hint(t.mode)}; the installed service is running again")
        planned = {"label": "plan (as installed)", "reference": False, "flags": tune.flags_of(plan),
                   "levels": report["levels"], "error": ""}
        info(tune.table([planned, row], levels, None))
        result["baseline"] = {"engine_defaults": row, "vs_defaults": tune.ratios(planned, row, levels)}
        info("plan / engine defaults: " + ", ".join(f"{v:.2f}x at {k}" for k, v in result["baseline"]["vs_defaults"]
                                                   .items()))
    return result


def _current_release(layout: Layout) -> Path | None:
    cur = layout.current.resolve() if layout.current.is_symlink() else None
    return cur if cur is not None and cur.is_dir() else None


def _prepare(layout: Layout, t: Target) -> str:
    """This bundle's folders, no half-built release left by a killed installer, the engine's
    account (process mode as root) and the API key."""
    made = make_dirs(layout.models) + make_dirs(layout.engines)  # shared by the bundles in this prefix
    made_etc = make_dirs(layout.etc, 0o700)
    make_dirs(layout.releases)  # inside PREFIX/NAME, which uninstall removes whole
    users = [t.user] if t.user and ensure_user(t.user) else []
    record_made(layout, made + made_etc, users)
    for stale in layout.releases.glob(".*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if t.user:
        give_to_user(layout, t.user)
    return ensure_env_file(layout)


def _same_release(previous: Path, layout: Layout, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan,
                  svc: Service, opts: Options) -> dict[str, Any]:
    """The release this bundle and plan make is the current one: leave it, or start it if it is down."""
    t = svc.target
    if state(previous) == RUNNING:  # running and holding its own port (ctl status)
        code, _ = (200, None) if svc.worker else http_json(svc.base + "/health")
        if code == 200:
            info(f"release {previous.name} is installed and healthy; nothing changed")
            return summary(layout, doc, m, plan, t, None, changed=False, extra=svc.extra, cluster=svc.cluster)
    info(f"release {previous.name} is installed but not running; starting it")
    start(previous, t.mode, layout)
    _wait_all(svc, layout, previous, None)
    answer = _smoke(svc, m, read_key(layout), plan, opts)
    return summary(layout, doc, m, plan, t, answer, changed=True, extra=svc.extra, cluster=svc.cluster)


def _start_new_release(opts: Options, doc: dict[str, Any], data: bytes, m: dict[str, Any], plan: planner.Plan,
                       layout: Layout, rid: str, svc: Service, key: str) -> tuple[Path, str | None, float]:
    """Build the release, start it and wait until it answers: (release, smoke answer, start time).
    A release that fails is stopped and removed before the error goes up."""
    # vLLM with tensor parallel can crash in its all-reduce paths where NVLink multicast is
    # off (VMs, PCIe cards): a crashed start is retried once with the safe flags, and said so.
    t = svc.target
    tries = [False, True] if engines.get(plan.engine).tp_retry and plan.tensor_parallel > 1 else [False]
    if len(tries) > 1 and (opts.safe_all_reduce or vllm.multicast_off(opts.environ)):
        tries = [True]
        info("tensor parallel with the safe all-reduce flags from the start (" +
             ("--safe-all-reduce" if opts.safe_all_reduce else "NVLink multicast is off in this environment") + ")")
    for safe in tries:
        facts = dict(svc.facts, release=release_name(rid, safe)) if svc.facts else None
        release = build_release(opts.bundle, doc, data, m, plan, layout, release_name(rid, safe), t,
                                safe=safe, extra=svc.extra, cluster=(svc.cluster, facts) if facts else None)
        info(f"release {release.name} built at {release}")
        t0 = time.monotonic()
        patterns = tuple(line for p in [plan, *(x.plan for x in svc.extra)] for line in engines.get(p.engine).fatal_log)
        watch = LogWatch(patterns, unit=layout.unit) if t.mode == "systemd" else LogWatch(patterns, layout.logfile)
        try:
            start(release, t.mode, layout)
            secs = _wait_all(svc, layout, release, watch)
            info(f"healthy after {secs:.1f}s")
            return release, _smoke(svc, m, key, plan, opts), t0
        except BaseException as e:
            ctl(release, "stop")
            shutil.rmtree(release, ignore_errors=True)
            if not safe and len(tries) > 1 and isinstance(e, BundlerError):
                warn(f"vLLM with tensor parallel {plan.tensor_parallel} failed to start ({e.message}); retrying "
                     "with the safe flags: --disable-custom-all-reduce and the all-reduce fusion off")
                continue
            warn(f"release {release.name} failed; removed it")
            raise
    raise AssertionError("unreachable: the last try returns or raises")


def _wait_all(svc: Service, layout: Layout, release: Path, watch: LogWatch | None) -> float:
    """Until every engine of the release answers /health (the main model's, then each other's), and
    each port is held by the release's own engine: only then may the key be sent there."""
    t = svc.target
    t0 = time.monotonic()
    if svc.worker:
        return _wait_worker(svc, layout, release)
    for base in [svc.base, *(svc.base_of(x.port) for x in svc.extra)]:
        left = max(1.0, svc.timeout - (time.monotonic() - t0))
        wait_healthy(base, left, layout.log_hint(t.mode), lambda r=release: engine_alive(r, layout, t.mode), watch)
    listener.require_ours(layout, t.mode, [t.port, *(x.port for x in svc.extra)])
    return time.monotonic() - t0


def _wait_worker(svc: Service, layout: Layout, release: Path) -> float:
    """A worker serves no API: it is up once its cluster_node answers checks as this release and its
    engine has not died (the engine itself waits for the head)."""
    from .. import cluster_node

    c, t0 = svc.cluster, time.monotonic()
    assert c is not None
    while time.monotonic() - t0 < 60:
        if not engine_alive(release, layout, svc.target.mode):
            raise BundlerError(f"the worker's engine exited while starting ({release.name})",
                               hint=f"see {layout.log_hint(svc.target.mode)}")
        try:
            if cluster_node.ask(c.address, c.check_port).get("release") == release.name:
                info(f"worker {c.rank}: answering the head's checks on {c.address}:{c.check_port}; its engine "
                     f"joins the head at {c.head}:{c.port} once the head starts (install there last)")
                return time.monotonic() - t0
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise BundlerError(f"the worker does not answer checks on {c.address}:{c.check_port} after 60 s",
                       hint=f"see {layout.log_hint(svc.target.mode)}")


def _smoke(svc: Service, m: dict[str, Any], key: str, plan: planner.Plan, opts: Options) -> str | None:
    """The smoke test for each model: a chat question for a model with its own chat template, a
    plain completion for one without (a base model), any text with --smoke-any-answer; for an
    embedding model, vectors in which two sentences that mean the same lie closer than a third."""
    if not opts.smoke or svc.worker:
        return None

    def one(base: str, mm: dict[str, Any], p: planner.Plan) -> str:
        if p.task == "embed":
            return smoke_embed(base, mm["name"], key, p.engine or "", opts.smoke_any_answer)
        expect = "any" if opts.smoke_any_answer else "chat" if (mm.get("facts") or {}).get("has_chat_template") \
            else "completion"
        return smoke(base, mm["name"], key, p.engine or "", expect)

    answer = one(svc.base, m, plan)
    for x in svc.extra:
        info(f"{x.m['name']} ({x.plan.task}, port {x.port}): {one(svc.base_of(x.port), x.m, x.plan)}")
    return answer


def _say_vulnerabilities(bundle: Path, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The vulnerability report made when the bundle was (a file of the verified bundle), printed; returned
    for --json (None when the bundle carries none)."""
    from .. import vulns

    import hashlib

    from ..contract import trust as policy

    entry = next((f for f in doc["files"] if f["path"] == vulns.REPORT), None)
    if entry is None:
        info("vulnerabilities: this bundle carries no report (made by an older airgap-llm)")
        return None
    try:  # read once, bounded, and shown only if these are the bytes the manifest pins
        data = policy.read_once(bundle / vulns.REPORT, policy.MAX_MANIFEST)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError("it changed after the bundle was verified")
        report = json.loads(data)
        lines = vulns.summary(report)
    except (OSError, ValueError, KeyError, TypeError) as e:
        report, lines = None, [f"vulnerabilities: the report does not read ({e})"]
    for line in lines:
        info(line)
    return report


def switch_current(layout: Layout, release: Path) -> None:
    from ..files import atomic_symlink

    atomic_symlink(Path("releases") / release.name, layout.current)
    with open(layout.history_file, "a") as f:  # the order releases went live, for --rollback
        f.write(release.name + "\n")


def history(layout: Layout) -> list[str]:
    try:
        names = layout.history_file.read_text().split()
    except FileNotFoundError:
        return []
    return [n for n in names if (layout.releases / n).is_dir()]


# ---- rollback ------------------------------------------------------------------------

def _layout_of_bundle(opts: Options) -> Layout:
    """The installed bundle's layout, by the name in the manifest bootstrap.py checked (a plain name:
    never a path that leads out of the prefix); what is removed or started comes from there."""
    from . import boot

    layout = layout_for(opts, boot.manifest(opts.bundle)[0]["name"])
    check_layout_owned(layout)
    return layout


def rollback(opts: Options) -> dict[str, Any]:
    layout = _layout_of_bundle(opts)
    if not layout.current.is_symlink():
        raise BundlerError(f"{layout.name} is not installed under {layout.prefix}", hint="check --prefix")
    with PrefixLock(layout.prefix):
        current = layout.current.resolve()
        older = [n for n in history(layout) if n != current.name]
        if not older:
            raise BundlerError(f"{current.name} is the only release under {layout.releases}; nothing to roll back "
                               "to", hint="install the bundle you want instead")
        back = layout.releases / older[-1]
        t = read_target(back)
        info(f"rolling back from {current.name} to {back.name}")
        if is_running(current):
            ctl(current, "stop")
        svc = Service(t, opts.timeout or 900.0, _members_of(back), *_cluster_of(back))
        start(back, t.mode, layout)
        try:
            _wait_all(svc, layout, back, None)
        except BundlerError:
            ctl(back, "stop")
            start(current, read_target(current).mode, layout)
            raise
        switch_current(layout, back)
        info(f"{back.name} is serving again; {current.name} is kept (run --rollback again to return to it)")
        plan = json.loads((back / "plan.json").read_text())
        doc = json.loads((back / "manifest.json").read_text())
        return summary(layout, doc, {"name": plan["model"]}, _plan_of(plan), t, None, changed=True, extra=svc.extra,
                       cluster=svc.cluster)


def _cluster_of(release: Path) -> tuple[clusters.Cluster | None, dict[str, Any] | None]:
    """A cluster release's place in its cluster (cluster.json), or (None, None) for one server's."""
    try:
        f = json.loads((release / "cluster.json").read_text())
        return clusters.Cluster(tuple(str(n) for n in f["nodes"]), int(f["rank"]), int(f["check_port"]) - 1, ""), f
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundlerError(f"{release / 'cluster.json'} does not read ({type(e).__name__}: {e})",
                           hint="install the bundle again with --nodes") from None


def _plan_of(d: dict[str, Any]) -> planner.Plan:
    return planner.Plan.from_dict(d)


def _members_of(release: Path) -> tuple[Member, ...]:
    """A release's other models (plans.json), for waiting on them and saying where they are."""
    try:
        rows = json.loads((release / "plans.json").read_text())
    except FileNotFoundError:
        return ()
    return tuple(Member({"name": r["model"]}, _plan_of(r["plan"]), int(r["port"])) for r in rows)


# ---- what is installed ---------------------------------------------------------------

def list_services(opts: Options) -> list[dict[str, Any]]:
    """Every service installed in the prefix: its state (ctl status), model, engine, endpoint, release."""
    prefix = layout_for(opts, "x").prefix
    rows = []
    for name in lay.installed_bundles(prefix):
        layout = layout_for(opts, name)
        release = _current_release(layout)
        if release is None:
            continue
        try:
            plan = json.loads((release / "plan.json").read_text())
            t = read_target(release)
            doc = json.loads((release / "manifest.json").read_text())
        except (OSError, ValueError, TypeError) as e:
            rows.append({"name": name, "state": f"unreadable ({e})", "release": release.name})
            continue
        st = state(release)
        rows.append({"name": name, "version": doc.get("version", ""), "state": {RUNNING: "running", 3: "stopped",
                     4: "running, port taken by another program"}.get(st, f"unknown (ctl status {st})"),
                     "model": plan.get("model", ""), "engine": plan.get("engine", ""),
                     "endpoint": f"http://{local_address(t.host)}:{t.port}/v1", "mode": t.mode,
                     "release": release.name, "ctl": str(layout.current / "bin" / "ctl")})
    return rows


def services_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no service is installed in this prefix"
    cols = ("name", "version", "state", "model", "engine", "endpoint", "release")
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---- uninstall -----------------------------------------------------------------------

def uninstall(opts: Options) -> None:
    """Remove what the installer made for this bundle, and the shared folders it made once no
    other bundle uses them; folders that were there before stay."""
    layout = _layout_of_bundle(opts)
    if not layout.prefix.is_dir():
        info(f"nothing is installed under {layout.prefix}")
        return
    removed: list[str] = []
    with PrefixLock(layout.prefix):
        cur = _current_release(layout)
        if cur is not None and is_running(cur):
            ctl(cur, "stop")
        if layout.unit_file.exists():
            subprocess.run(["systemctl", "stop", layout.unit], capture_output=True)
            subprocess.run(["systemctl", "clean", "--what=cache", layout.unit], capture_output=True)
            remove_unit(layout)
            removed.append(str(layout.unit_file))
        for p in (layout.home, layout.env_file):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.append(str(p))
            elif p.exists() or p.is_symlink():
                p.unlink()
                removed.append(str(p))
        mk = lay.made(layout)
        others = [n for n in lay.installed_bundles(layout.prefix) if n != layout.name]
        gone: list[Path] = []
        if not others:
            gone.append(layout.engines)
            if opts.purge:
                gone += [layout.models, layout.trusted]
        for p in gone:
            if str(p) in mk["dirs"]:
                if p.is_dir():
                    shutil.rmtree(p)
                    removed.append(str(p))
        if opts.purge:
            _forget_accepted(layout)
            if not others:
                for u in mk["users"]:
                    remove_user(u)
                    removed.append(f"user {u}")
        if not others and (opts.purge or not layout.models.exists()):
            for p in (layout.made_file, layout.prefix / ".install.lock"):
                if p.exists():
                    p.unlink()
            for d in sorted((Path(x) for x in mk["dirs"]), key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()  # only if empty: what others put there stays
                    removed.append(str(d))
                except OSError:
                    pass
    info("removed: " + (", ".join(removed) if removed else "nothing (not installed here)"))
    if not opts.purge and layout.models.is_dir():
        info(f"kept the models in {layout.models} (--purge removes them)")


def _forget_accepted(layout: Layout) -> None:
    try:
        acc = json.loads(layout.accepted.read_text())
    except (FileNotFoundError, ValueError):
        return
    acc.pop(layout.name, None)
    if acc:
        layout.accepted.write_text(json.dumps(acc, indent=2) + "\n")
    else:
        layout.accepted.unlink()


# ---- what the operator sees ---------------------------------------------------------

def summary(layout: Layout, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan, t: Target,
            answer: str | None, changed: bool, extra: tuple[Member, ...] = (),
            cluster: clusters.Cluster | None = None) -> dict[str, Any]:
    endpoint = f"http://{local_address(t.host)}:{t.port}/v1"
    worker = cluster is not None and cluster.rank > 0
    if worker:  # the service answers at the head, with the head's key
        endpoint = f"http://{cluster.head if t.host in ('0.0.0.0', '::') else local_address(t.host)}:{t.port}/v1"
    models = [{"model": m["name"], "task": plan.task, "engine": plan.engine, "endpoint": endpoint},
              *({"model": x.m["name"], "task": x.plan.task, "engine": x.plan.engine,
                 "endpoint": f"http://{local_address(t.host)}:{x.port}/v1"} for x in extra)]
    return {
        "models": models,
        "endpoint": endpoint,
        "warnings": [w for pl in [plan, *(x.plan for x in extra)] for w in pl.warnings],
        "api_key_file": str(layout.env_file) + (" (not used by clients: they use the head's key)" if worker else ""),
        "model": m["name"],
        "engine": plan.engine,
        "service": (f"{layout.unit} (systemd; logs: journalctl -u {layout.unit})" if t.mode == "systemd"
                    else f"process (pid file {layout.pidfile}, log {layout.logfile})"),
        "mode": t.mode,
        "user": t.user or None,
        "stop_command": stop_command(layout, t.mode),
        "ctl": str(layout.current / "bin" / "ctl"),
        "release": str(layout.current.resolve()),
        "changed": changed,
        "answer": answer,
        **({"cluster": {"nodes": list(cluster.nodes), "rank": cluster.rank, "role": cluster.role,
                        "port": cluster.port, "check_port": cluster.check_port}} if cluster else {}),
        # the key read from the env file at run time and given to curl on its standard input: never on
        # a command line, where every local user can read it in /proc
        # and only once `ctl status` has seen the service's own engine holding the port
        "curl": (f"# a worker serves no API: on the head ({cluster.head}), its summary's command asks {endpoint} with "
                 "the head's key" if worker else
                 f"{shlex.quote(str(layout.current / 'bin' / 'ctl'))} status && "
                 f"sed -n 's/^LLAMA_API_KEY=/Authorization: Bearer /p' {shlex.quote(str(layout.env_file))} | "
                 f"curl -s {shlex.quote(endpoint + '/chat/completions')} -H @- -H 'Content-Type: application/json' "
                 "-d " + shlex.quote(json.dumps({"model": m["name"], "max_tokens": 64, "temperature": 0, "messages": [
                     {"role": "user", "content": "What is the capital of France? Answer with one word."}]}))),
    }
