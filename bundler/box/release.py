"""Step 5: a release under PREFIX/NAME/releases/ID, built whole or not at all: the installer's
own code (hash-locked wheels, no venv, no pip), the engine, the model stored once by content,
the launch and ctl scripts and the systemd unit, all rendered from one plan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import manifest as mf
from .. import planner
from .. import engines
from ..errors import BundlerError
from ..render import render
from ..staging import staged_dir
from . import wheels
from .layout import Layout, make_dirs
from .preflight import triton_toolchain
from .report import info


@dataclass(frozen=True)
class Target:
    """Where and how the release will run."""

    host: str
    port: int
    mode: str  # systemd | process
    user: str  # process mode as root: the engine's account ("" = the installer's own user)


def local_address(host: str) -> str:
    """Where this box reaches a service listening on host (a wildcard means loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _copy_hashing(src: Path, dst: Path, sha256: str, label: str | None) -> None:
    """Copy src to dst through a .incomplete file, hashing what is written; refuse on mismatch."""
    from ..files import copy_hashing
    from ..progress import bar as tqdm

    tmp = dst.with_name(dst.name + ".incomplete")
    if os.path.lexists(tmp):  # a killed install's left-over
        os.unlink(tmp)
    with tqdm(total=src.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=label, mininterval=0.3,
              disable=label is None) as bar:
        digest = copy_hashing(src, tmp, bar.update)
    if digest != sha256:
        tmp.unlink()
        raise BundlerError(f"{src} changed while it was copied (sha256 {digest}, expected {sha256}); "
                           "nothing was installed", hint="copy the bundle again, to a folder only root can write")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


def store_model(bundle: Path, m: dict[str, Any], layout: Layout) -> Path:
    """Models are stored once by content: PREFIX/models/SHA256/FILE (SHA256 of the first file), a
    split GGUF's other parts beside it; each hashed as it is copied. Returns the first file."""
    folder = layout.models / m["sha256"]
    if m.get("dir"):  # a whole repository (safetensors): its files under PREFIX/models/TREE-ID/, as laid out
        for f in m["files"]:
            parts = Path(f["path"]).parts
            if not parts or Path(f["path"]).is_absolute() or ".." in parts:
                raise BundlerError(f"manifest.json: model {m['name']} names the file {f['path']!r}, which is not a "
                                   "plain path inside its folder; nothing was installed", hint="bundle it again")
        todo = [(f"{m['file']}/{f['path']}", f["path"], f["sha256"], f"model {m['name']}: {f['path']}")
                for f in m["files"]]
        stored = folder
    else:
        todo = [(rel, Path(rel).name, sha, f"model {Path(rel).name}")
                for rel, sha in [(m["file"], m["sha256"]), *((p["file"], p["sha256"]) for p in m.get("parts", ()))]]
        stored = folder / Path(m["file"]).name
    for rel, name, sha, label in todo:  # path in the bundle, path under the model's folder, sha256, progress label
        dest = folder / name
        if dest.is_file() and dest.stat().st_size == (bundle / rel).stat().st_size and mf.sha256_file(dest) == sha:
            continue
        make_dirs(dest.parent)
        _copy_hashing(bundle / rel, dest, sha, label)
    return stored


def engine_site(bundle: Path, doc: dict[str, Any], engine: dict[str, Any], layout: Layout) -> Path:
    """A Python engine's wheels (vLLM's, ExLlamaV2's) installed once per lock under PREFIX/engines and
    shared by the releases that use that lock: a re-plan (other TP/DP, context, port) or a rollback
    does not reinstall a GB of wheels. The lock and the wheels are copied while hashed, then used."""
    lock_rel = f"{engine['dir']}/requirements.lock"
    lock_sha = next((f["sha256"] for f in doc["files"] if f["path"] == lock_rel), None)
    if lock_sha is None:
        raise BundlerError(f"the manifest lists no {lock_rel}", hint="bundle it again")
    name = engine["name"]
    home = layout.engines / f"{name}-{engine['version']}-{lock_sha[:16]}"
    label = f"{engines.get(name).label} {engine['version']}"
    if (home / "complete").is_file():
        info(f"{label}: reusing {home} (same lock)")
        return home / "site"
    info(f"installing {label} into {home} ({engine['lock']['carried']} wheels; "
         f"{engine['lock']['reused']} packages reused from this box's python; compiling to bytecode once, so "
         "that every engine process does not)")
    make_dirs(layout.engines)
    with staged_dir(home, home.with_name(home.name + ".partial")) as partial:
        copy_verified(bundle, doc, lock_rel, partial)
        chosen = wheels.select(partial / "requirements.lock", bundle / engine["dir"] / "wheels", partial / ".wheels")
        secs = wheels.install(chosen, partial / "site")
        shutil.rmtree(partial / ".wheels")
        info(f"unpacked {len(chosen)} wheels in {secs:.1f}s")
        # -I -S: no site.py, so no .pth file of the box's python runs as root here
        subprocess.run([sys.executable, "-I", "-S", "-m", "compileall", "-q", "-j", "0", str(partial / "site")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (partial / "complete").write_text(engine["version"] + "\n")
    return home / "site"


def copy_verified(bundle: Path, doc: dict[str, Any], folder: str, dest: Path) -> None:
    """The files the manifest lists under `folder`, copied into dest and hashed as they are written
    (a file swapped in the bundle after the check is refused, not run)."""
    for f in doc["files"]:
        if f["path"].startswith(folder + "/") or f["path"] == folder:
            rel = f["path"][len(folder) + 1:] if f["path"] != folder else Path(folder).name
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            _copy_hashing(bundle / f["path"], out, f["sha256"], None)
            os.chmod(out, f.get("mode", 0o644))


def _triton_cc(bundle: Path, doc: dict[str, Any], tools: dict[str, str], site: Path, final: Path, stage: Path,
               extra_env: dict[str, str], cache_vars: dict[str, str]) -> None:
    """Triton's launchers (vLLM's and ExLlamaV3's kernels) compile with the box's compiler and headers
    where it has both; else CC names a wrapper (bin/cc) around the bundle's Zig clang and/or headers."""
    if tools["cc"] and not tools["headers"]:
        return
    if tools["headers"] and not (stage / "include").is_dir():
        copy_verified(bundle, doc, tools["headers"], stage / "include")
    cc = stage / "bin" / "cc"
    if not cc.is_file():
        includes = [str(final / "include" / d.name) for d in sorted((stage / "include").glob("python3*"))]
        compiler = f"this box's {tools['cc']}" if tools["cc"] else "Zig clang, from the bundle"
        headers = "the bundle's" if tools["headers"] else "this box's"
        cc.write_text(render("cc.sh.j2", {
            "what": f"{compiler}, with {headers} Python headers",
            "compiler": [tools["cc"]] if tools["cc"] else [str(site / "ziglang" / "zig"), "cc"],
            "includes": [*includes, str(final / "include")] if includes else []}))
    extra_env["CC"] = str(final / "bin" / "cc")
    if not tools["cc"]:
        cache_vars.update({"ZIG_GLOBAL_CACHE_DIR": "zig", "ZIG_LOCAL_CACHE_DIR": "zig"})


@dataclass(frozen=True)
class Member:
    """One more model of the release (an embedding model beside the chat model): its own engine and port."""

    m: dict[str, Any]
    plan: planner.Plan
    port: int


@dataclass
class LaunchContext:
    """What an engine's launch(ctx) gets from the release being written: the plan, the model and address,
    its entry in the manifest, and the release's helpers (copies hashed against the manifest)."""

    bundle: Path
    doc: dict[str, Any]
    entry: dict[str, Any]  # the engine's entry in the manifest (its build for the plan's backend)
    plan: planner.Plan
    model_path: str
    name: str  # the model's name, as clients ask for it
    host: str
    port: int
    safe: bool  # tensor parallel with the safe all-reduce flags
    final: Path  # the release's folder once committed: paths in the launch script point here
    stage: Path  # the release's folder while it is written
    layout: Layout
    copied: dict[str, str]  # engine build folder in the bundle → its folder in the release
    python: str = sys.executable
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def site(self) -> Path:
        """A Python engine's wheels, installed once per lock under PREFIX/engines."""
        return engine_site(self.bundle, self.doc, self.entry, self.layout)

    def engine_dir(self) -> str:
        """The engine's build folder copied into the release once per build: its folder name there."""
        folder = self.copied.get(self.entry["dir"])
        if folder is None:
            folder = "engine" if not self.copied else f"engine-{self.entry['backend']}"
            copy_verified(self.bundle, self.doc, self.entry["dir"], self.stage / folder)
            self.copied[self.entry["dir"]] = folder
        return folder

    def copy(self, folder: str, name: str) -> Path:
        """A folder of the bundle copied (hashed) into the release once, as `name`: its final path."""
        if not (self.stage / name).is_dir():
            copy_verified(self.bundle, self.doc, folder, self.stage / name)
        return self.final / name

    def write(self, name: str, text: str) -> Path:
        (self.stage / name).write_text(text)
        return self.final / name

    def triton_tools(self) -> dict[str, str]:
        return triton_toolchain(self.doc, self.entry["name"], say=False)

    def triton_cc(self, tools: dict[str, str], site: Path, env: dict[str, str], cache_vars: dict[str, str]) -> None:
        _triton_cc(self.bundle, self.doc, tools, site, self.final, self.stage, env, cache_vars)

    def say(self, line: str) -> None:
        info(line)


def _engine_script(bundle: Path, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan, layout: Layout,
                   rid: str, final: Path, stage: Path, host: str, port: int, safe: bool, copied: dict[str, str],
                   cluster: tuple[Any, dict[str, Any]] | None = None) -> str:
    """The launch script of one engine serving one model (rendered text): the engine says how it starts."""
    model_path = Path(m["file"]) if m.get("on_box") else store_model(bundle, m, layout)
    engine = engines.get(plan.engine)
    entry = next((e for e in doc["engines"] if e["name"] == plan.engine and e.get("backend") == plan.backend), None)
    if entry is None or engine.launch is None:
        raise BundlerError(f"this bundle has no {engine.label} build for the {plan.backend} backend the plan chose",
                           hint="bundle again with that engine")
    run = engine.launch(LaunchContext(bundle, doc, entry, plan, str(model_path), m["name"], host, port, safe, final,
                                      stage, layout, copied))
    argv, env = list(run.argv), dict(run.env)
    if cluster is not None:  # one server of several: cluster_node answers the others' checks and runs the engine
        c, facts = cluster
        if engine.cluster is None:
            raise BundlerError(f"{engine.label} does not serve across servers", hint="leave --nodes out")
        more, cenv = engine.cluster(plan, c.rank, c.head, c.port, c.address, c.interface)
        (stage / "cluster.json").write_text(json.dumps(facts, indent=2) + "\n")
        argv = [sys.executable, "-S", "-m", "bundler.cluster_node", str(final / "cluster.json"), "--", *argv, *more]
        env.update(cenv)
        if str(final / "site") not in env.get("PYTHONPATH", "").split(":"):
            env["PYTHONPATH"] = ":".join(filter(None, [env.get("PYTHONPATH"), str(final / "site")]))
    return render("launch.sh.j2", {
        "engine": plan.engine, "name": layout.name, "release": rid, "env_file": str(layout.env_file),
        "argv": argv, "lib_dir": ":".join(run.lib_dirs), "extra_env": env, "cache_dir": str(layout.cache),
        "cache_vars": run.cache_vars, "banner": run.banner})


def build_release(bundle: Path, doc: dict[str, Any], data: bytes, m: dict[str, Any], plan: planner.Plan,
                  layout: Layout, rid: str, target: Target, safe: bool = False, extra: tuple[Member, ...] = (),
                  cluster: tuple[Any, dict[str, Any]] | None = None) -> Path:
    final = layout.releases / rid
    make_dirs(layout.releases)
    with staged_dir(final, layout.releases / f".{rid}.partial") as stage:
        os.chmod(stage, 0o755)
        (stage / "manifest.json").write_bytes(data)  # the bytes whose signature was checked
        copy_verified(bundle, doc, "README.txt", stage)
        copy_verified(bundle, doc, "requirements.lock", stage)
        info("unpacking the installer's wheels into the release (hash-checked; no pip, no venv)")
        # the lock as copied (and hashed) into the release, not the bundle's, which could change meanwhile
        wheels.install(wheels.select(stage / "requirements.lock", bundle / "wheels", stage / ".wheels"),
                       stage / "site", scripts=stage / "site-bin")
        shutil.rmtree(stage / ".wheels")
        bindir = stage / "bin"
        bindir.mkdir()
        copied: dict[str, str] = {}
        main = _engine_script(bundle, doc, m, plan, layout, rid, final, stage, target.host, target.port, safe, copied,
                              cluster)
        if not extra:
            (bindir / "launch").write_text(main)
        else:  # one engine per model, started and stopped together (group.sh.j2)
            names = [m["name"], *(x.m["name"] for x in extra)]
            (bindir / "launch-0").write_text(main)
            for i, x in enumerate(extra, 1):
                (bindir / f"launch-{i}").write_text(_engine_script(bundle, doc, x.m, x.plan, layout, rid, final, stage,
                                                                   target.host, x.port, False, copied))
            # the other models first, each healthy before the next starts where vLLM is one of them
            # (group.sh.j2 says why); the main model last
            serial = any(engines.get(p.engine).serial_start for p in [plan, *(x.plan for x in extra)])
            members = [(x.m["name"], str(final / "bin" / f"launch-{i}"),
                        f"http://{local_address(target.host)}:{x.port}/health" if serial else "")
                       for i, x in enumerate(extra, 1)]
            (bindir / "launch").write_text(render("group.sh.j2", {
                "name": layout.name, "release": rid, "python": sys.executable,
                "members": [*members, (names[0], str(final / "bin" / "launch-0"), "")]}))
        unit_src = final / "systemd" / layout.unit
        (bindir / "ctl").write_text(render("ctl.sh.j2", {
            "name": layout.name, "release": rid, "mode": target.mode, "unit": layout.unit,
            "unit_src": str(unit_src), "unit_file": str(layout.unit_file), "pidfile": str(layout.pidfile),
            "logfile": str(layout.logfile), "python": sys.executable, "site": str(final / "site"),
            "launch": str(final / "bin" / "launch"), "env_file": str(layout.env_file), "user": target.user,
            "home": str(layout.cache),
            # a cluster's worker serves no API: what it holds is the port answering the head's checks; the
            # head holds its API and that port too (a local user who took it would answer for the head)
            "ports": [cluster[0].check_port] if cluster and cluster[0].rank
            else [target.port, *(x.port for x in extra), *([cluster[0].check_port] if cluster else [])]}))
        for f in bindir.iterdir():
            f.chmod(0o755)
        plans = [plan, *(x.plan for x in extra)]
        names_used = sorted({p.engine or "" for p in plans})
        (stage / "systemd").mkdir()
        (stage / "systemd" / layout.unit).write_text(render("unit.service.j2", {
            "name": layout.name, "engine": "+".join(names_used),
            "model": ", ".join([m["name"], *(x.m["name"] for x in extra)]),
            "prefix": str(layout.prefix), "release": rid, "release_dir": str(final), "env_file": str(layout.env_file),
            "gpus": any(p.backend == "cuda" for p in plans), "cluster": cluster is not None}))
        (stage / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        if extra:
            (stage / "plans.json").write_text(json.dumps(
                [{"model": x.m["name"], "task": x.plan.task, "port": x.port, "plan": x.plan.to_dict()}
                 for x in extra], indent=2) + "\n")
        (stage / "target.json").write_text(json.dumps(target.__dict__, indent=2) + "\n")
    return final


def read_target(release: Path) -> Target:
    return Target(**json.loads((release / "target.json").read_text()))
