"""Step 5: a release under PREFIX/NAME/releases/ID, built whole or not at all: the installer's
own code (hash-locked wheels, no venv, no pip), the engine, the model stored once by content,
the launch and ctl scripts and the systemd unit, all rendered from one plan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import manifest as mf
from .. import planner
from .. import engines
from ..engines import exllama, llama_cpp, vllm
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
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(partial / "site")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (partial / "complete").write_text(engine["version"] + "\n")
    return home / "site"


def prove_extension(site: Path, engine: dict[str, Any]) -> None:
    """ExLlama's prebuilt extension imports with this box's torch (else exllamavN would try to compile
    it at the engine's start, with a compiler the box may not have, and fail long after the install)."""
    gen = exllama.GENS[engine["name"]]
    code = (f"import torch, {gen.ext_module}, {gen.name}.ext as e; "
            f"print(torch.__version__, torch.version.cuda, e.{gen.ext_module}.__file__)")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(site)),
                           capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BundlerError(f"importing {gen.label}'s extension took over 10 minutes", hint="is the box very loaded?")
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise BundlerError(f"{gen.label}'s extension ({engine.get('extension', gen.ext_module)}) does not import with "
                           f"this box's python {sys.executable}: {' | '.join(tail)}; nothing was started",
                           hint="the bundle was made for another Python, torch or CUDA: make the probe file here "
                                "(./install.sh --probe > box.json) and bundle again with TARGET=box.json")
    info(f"{gen.label}'s extension imports (torch, CUDA, file: {r.stdout.strip()})")


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


def _engine_script(bundle: Path, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan, layout: Layout,
                   rid: str, final: Path, stage: Path, host: str, port: int, safe: bool, copied: dict[str, str]
                   ) -> str:
    """The launch script of one engine serving one model (rendered text); the engine's files are
    copied into the release once per engine build (`copied`: build dir → folder in the release)."""
    model_path = Path(m["file"]) if m.get("on_box") else store_model(bundle, m, layout)
    lib_dirs: list[str] = []
    banner = ""
    extra_env: dict[str, str] = {}
    cache_vars: dict[str, str] = {}
    if plan.engine == "vllm":
        engine = next(e for e in doc["engines"] if e["name"] == vllm.NAME)
        site = engine_site(bundle, doc, engine, layout)
        argv = vllm.launch_argv(sys.executable, str(model_path), m["name"], host, port, plan, safe, engine["version"])
        # the engine's wheels, then the release's own site (the middleware that guards every route)
        extra_env = {"PYTHONPATH": f"{site}:{final / 'site'}", **vllm.OFFLINE_ENV, **vllm.host_ip_env(host),
                     **vllm.multicast_env(dict(os.environ))}
        cache_vars = dict(vllm.CACHE_VARS)
        tools = triton_toolchain(doc, engine["name"], say=False)
        if not tools["flashinfer_jit"]:
            extra_env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
        _triton_cc(bundle, doc, tools, site, final, stage, extra_env, cache_vars)
    elif plan.engine in exllama.GENS:
        engine = next(e for e in doc["engines"] if e["name"] == plan.engine)
        site = engine_site(bundle, doc, engine, layout)
        prove_extension(site, engine)
        if not (stage / "tabbyapi").is_dir():
            copy_verified(bundle, doc, engine["tabbyapi"], stage / "tabbyapi")
        conf = stage / f"tabbyapi-{port}.json"
        conf.write_text(json.dumps(exllama.tabby_config(plan, str(model_path), m["name"], host, port), indent=2) + "\n")
        argv = [sys.executable, "-m", "bundler.engines.tabby_run", str(final / "tabbyapi"), str(final / conf.name)]
        # the engine's wheels (the box's torch stays where it is), then the release's own site (tabby_run)
        extra_env = {"PYTHONPATH": f"{site}:{final / 'site'}", **vllm.OFFLINE_ENV}
        # TabbyAPI's working folder of each start (tabby_run.py), and ExLlama's own kernel caches
        cache_vars = {"AIRGAP_LLM_RUN_DIR": "run", "TRITON_CACHE_DIR": "triton", "TORCH_EXTENSIONS_DIR": "torch-ext"}
        gen = exllama.GENS[plan.engine]
        if gen is exllama.V2:
            # no bundle carries flash-attn, yet exllamav2 leaves its config's no_flash_attn off without it, so
            # TabbyAPI picks the paged generator and the load fails on cc >= 8 ("Paged attention required Flash
            # Attention 2.5.7", ../shared/EXLLAMA.md); with this set TabbyAPI serves in its compatibility mode,
            # one request at a time, as the plan says
            extra_env["EXLLAMA_NO_FLASH_ATTN"] = "1"
        if gen.triton:  # ExLlamaV3 attends with Triton kernels, which compile a C launcher at first use
            _triton_cc(bundle, doc, triton_toolchain(doc, engine["name"], say=False), site, final, stage, extra_env,
                       cache_vars)
    else:
        engine = next(e for e in doc["engines"] if e["name"] == llama_cpp.NAME and e["backend"] == plan.backend)
        folder = copied.get(engine["dir"])
        if folder is None:
            folder = "engine" if not copied else f"engine-{plan.backend}"
            copy_verified(bundle, doc, engine["dir"], stage / folder)
            copied[engine["dir"]] = folder
        # a CPU build carries one binary per instruction-set level: the one the plan chose for this CPU
        exe = f"llama-server-{plan.cpu_variant}" if plan.cpu_variant else "llama-server"
        if not (stage / folder / "bin" / exe).is_file():
            raise BundlerError(f"the bundle has no {exe} for the plan's CPU level", hint="bundle again")
        argv = llama_cpp.launch_argv(str(final / folder / "bin" / exe), str(model_path), m["name"], host, port, plan)
        level = next((r for r in plan.reasons if r.startswith("CPU backend")), "")
        banner = f"airgap-llm: starting {exe}" + (f"; {level}" if level else "")
        lib_dirs = [str(final / folder / "lib"), *engine.get("box_lib_dirs", [])]
    return render("launch.sh.j2", {
        "engine": plan.engine, "name": layout.name, "release": rid, "env_file": str(layout.env_file),
        "argv": argv, "lib_dir": ":".join(lib_dirs), "extra_env": extra_env, "cache_dir": str(layout.cache),
        "cache_vars": cache_vars, "banner": banner})


def build_release(bundle: Path, doc: dict[str, Any], data: bytes, m: dict[str, Any], plan: planner.Plan,
                  layout: Layout, rid: str, target: Target, safe: bool = False, extra: tuple[Member, ...] = ()) -> Path:
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
        main = _engine_script(bundle, doc, m, plan, layout, rid, final, stage, target.host, target.port, safe, copied)
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
            "home": str(layout.cache), "ports": [target.port, *(x.port for x in extra)]}))
        for f in bindir.iterdir():
            f.chmod(0o755)
        plans = [plan, *(x.plan for x in extra)]
        names_used = sorted({p.engine or "" for p in plans})
        (stage / "systemd").mkdir()
        (stage / "systemd" / layout.unit).write_text(render("unit.service.j2", {
            "name": layout.name, "engine": "+".join(names_used),
            "model": ", ".join([m["name"], *(x.m["name"] for x in extra)]),
            "prefix": str(layout.prefix), "release": rid, "release_dir": str(final), "env_file": str(layout.env_file),
            "gpus": any(p.backend == "cuda" for p in plans)}))
        (stage / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        if extra:
            (stage / "plans.json").write_text(json.dumps(
                [{"model": x.m["name"], "task": x.plan.task, "port": x.port, "plan": x.plan.to_dict()}
                 for x in extra], indent=2) + "\n")
        (stage / "target.json").write_text(json.dumps(target.__dict__, indent=2) + "\n")
    return final


def read_target(release: Path) -> Target:
    return Target(**json.loads((release / "target.json").read_text()))
