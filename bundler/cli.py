"""`bundler` command line: argparse → one function per command → exit code.

The only place that turns BundlerError into `error:`/`hint:` lines (exit 1,
3 for a refused plan); usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import BundlerError, report


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_bundle(a: argparse.Namespace) -> int:
    from . import bundle, spec

    if sys.version_info < (3, 10):
        raise BundlerError("bundling needs Python >= 3.10", hint="run make bundle with a newer python3")
    _need_bundle_extra()
    from .probe import load_probe

    s = spec.load(a.spec)
    target = load_probe(a.target, "--target") if a.target else None
    part = parse_size(a.part_size, "--part-size") if a.part_size else 0
    if part and part < 1 << 20:
        raise BundlerError(f"--part-size {a.part_size} is under 1 MiB", hint="e.g. --part-size 60M")
    log(f"bundling {s.name} {s.version} from {a.spec}")
    r = bundle.make(s, Path(a.out), log=log, target=target, reuse_installed=a.reuse_installed, part_size=part,
                    sign=not a.unsigned, upgrade_models=a.upgrade_models, base=Path(a.base) if a.base else None)
    pythons = ", ".join(json.loads((r.directory / "manifest.json").read_text())["pythons"])
    from .signing import key_paths

    pub = key_paths()[1]
    trust = "--allow-unsigned" if a.unsigned else f"--trust {pub.name}"
    # a delta: unpacked beside the old bundle, which the installer takes the other files from
    base = " --base FOLDER_OF_THE_OLD_BUNDLE" if a.base else ""
    carry = (f"  tar: {r.tar} ({_size(r.tar.stat().st_size)})\n" if r.tar.exists() else
             f"  split for transfer: no file in {r.directory} is larger than {a.part_size}; carry the directory\n")
    print(f"\nbundle ready in {r.seconds:.0f}s: {r.directory} ({_size(r.size)})\n{carry}"
          f"  the box needs: Linux on this CPU architecture, python3 {pythons}\n"
          + (f"next: copy {r.tar.name} and {r.tar.name.replace('.tar', '.unpack.py')} to the offline box, then:\n"
             f"  python3 {s.name}.unpack.py {'' if a.unsigned else trust + ' '}{r.tar.name} && cd {s.name} && "
             f"sudo ./install.sh {trust}{base}"
             if r.tar.exists() else
             f"next: copy the directory {s.name}/ to the offline box, then:\n"
             f"  cd {s.name} && sudo ./install.sh {trust}{base}   (it joins the parts)")
          + ("" if a.unsigned else f"\n  (signed: give the box {pub} by another way, once)")
          + _out_of_band(r.directory))
    return 0


BUNDLE_SIDE = {"piptools": "pip-tools", "requests": "requests", "huggingface_hub": "huggingface_hub", "gguf": "gguf",
               "uv": "uv", "cryptography": "cryptography"}


def _need_bundle_extra() -> None:
    """Bundling needs the [bundle] extra; without it pip-compile failed with a hint about the index."""
    import importlib.util

    missing = [pkg for mod, pkg in BUNDLE_SIDE.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise BundlerError(f"bundling needs packages this Python lacks: {', '.join(missing)}",
                           hint="install the bundling side: pip install -e '.[bundle]' (make bundle does it in .venv)")


def _out_of_band(d: Path) -> str:
    """What an operator checks by another way, beside the key: the code that runs first (the
    unpacker beside the tar, then install.sh and bootstrap.py)."""
    from .manifest import sha256_file

    doc = json.loads((d / "manifest.json").read_text())
    lines = [f"\n  give with the key, to check before the first run: key {doc.get('signed_by', '(unsigned)')}"]
    unpack = d.parent / f"{d.name}.unpack.py"
    for path in ([unpack] if unpack.exists() else []) + [d / "install.sh", d / "bootstrap.py"]:
        lines.append(f"    sha256 {sha256_file(path)}  {path.name}")
    return "\n".join(lines)


def cmd_check(a: argparse.Namespace) -> int:
    """The whole spec and what bundling it for the target needs, in seconds: nothing is downloaded or built."""
    from . import bundle, spec
    from .probe import load_probe

    t0 = time.monotonic()
    s = spec.load(a.spec)
    target = load_probe(a.target, "--target") if a.target else None
    for line in bundle.check(s, target, a.reuse_installed):
        print(line)
    if not a.offline:  # where each model comes from, asked cheaply: metadata, not bytes
        from . import sources

        for m in s.models:
            print("  source: " + sources.resolve(m))
        if target is not None:
            _plan_for_target(s, target)
    print(f"{a.spec}: ok ({time.monotonic() - t0:.1f}s); make bundle SPEC={a.spec} builds it")
    return 0


def _plan_for_target(s: Any, target: Any) -> None:
    """The plan each model gets on the target box, where its facts are cheap to know (a local GGUF's
    header, a repository's config and listing); the others are planned on the box itself."""
    from . import planner, sources
    from .spec import engine_builds

    engines = [name for b in engine_builds() if b.wanted(s) for name in b.offers(s)]
    intent = planner.Intent(s.service.concurrency, s.service.context)
    for m in s.models:
        info = sources.facts_cheaply(m)
        if info is None:
            print(f"  plan: {m.name}: planned on the box (its facts come with its bytes)")
            continue
        p = planner.plan(m.name, info, target, intent, engines_available=tuple(engines))
        print(f"  plan: {m.name}: {p.engine} ({p.backend}), tensor parallel {p.tensor_parallel} × data parallel "
              f"{p.data_parallel}, {p.slots} requests × {p.context_per_slot} tokens")
        for line in planner.explain(p, reasons=False):
            print("  " + line)


def cmd_verify(a: argparse.Namespace) -> int:
    from . import manifest, safetar

    t0 = time.monotonic()
    if Path(a.path).is_file():  # a tar: members checked against its manifest (and --trust), nothing written
        from . import signing

        signed_by = safetar.signed_by_one_of([signing.read_public_key(Path(t)) for t in a.trust]) if a.trust else None
        problems = safetar.check(a.path, signed_by=signed_by)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            raise BundlerError(f"{a.path}: {len(problems)} problem(s) found", hint="copy the tar again from its source")
        print(f"{a.path}: every member matches the manifest" + (", signed by a key given with --trust" if a.trust
                                                                  else "; the signature was NOT checked (--trust "
                                                                  "KEY.pub)") + f" ({time.monotonic() - t0:.1f}s)")
        return 0
    root = Path(a.path)
    data = manifest.read_bytes(root)
    doc, problems = manifest.verify(root, data=data)
    # a delta bundle's files left to its base are missing by design until install.sh --base fills them in
    left = set((doc.get("delta") or {}).get("from_base") or ())
    problems = [p for p in problems if not (p.kind == "missing" and p.path in left)]
    total = sum(f["size"] for f in doc.get("files", []) if f["path"] not in left)
    secs = time.monotonic() - t0
    lines = [p.describe() for p in problems]
    if a.trust:
        lines += _signature_problems(root, data, [Path(t) for t in a.trust])
    for line in lines:
        print(line, file=sys.stderr)
    if lines:
        raise BundlerError(f"{a.path}: {len(lines)} problem(s) found", hint="copy the bundle again from its source")
    if a.trust:
        print(f"{a.path}: manifest.json signed by a key given with --trust")
    if left:
        b = doc["delta"]["base"]
        print(f"{a.path}: a delta over {b['name']} {b['version']}: {len(left)} file(s) come from that bundle on the "
              "box (install.sh --base ITS_FOLDER)")
    print(f"{a.path}: {len(doc['files']) - len(left)} files, {_size(total)} verified in {secs:.1f}s "
          f"({total / max(secs, 1e-9) / 1e9:.2f} GB/s)"
          + ("" if a.trust else "; the signature was NOT checked: whoever changed the files could have rewritten "
             "the manifest too (pass --trust KEY.pub)"))
    return 0


def _signature_problems(root: Path, data: bytes, keys: list[Path]) -> list[str]:
    """Why the manifest's signature does not verify with any of `keys` (none when one verifies)."""
    from . import signing

    try:
        sig = signing.read_signature(root)
    except BundlerError as e:
        return [f"{signing.SIG_NAME}: {e.message}"]
    if sig is None:
        return [f"{signing.SIG_NAME}: missing (the bundle is not signed)"]
    pubs = [signing.read_public_key(k) for k in keys]
    if not any(signing.check(root, sig, pub, data) for pub in pubs):
        known = ", ".join(p.fingerprint for p in pubs)
        return [f"{signing.SIG_NAME}: does not verify manifest.json with the key(s) given ({known}); "
                f"it names key ID {sig.label}"]
    return []


def cmd_keygen(a: argparse.Namespace) -> int:
    from . import signing

    signing.keygen(log, a.force)
    return 0


def cmd_unpack(a: argparse.Namespace) -> int:
    from . import safetar

    return safetar.main([a.tar, a.dest])


def cmd_probe(a: argparse.Namespace) -> int:
    from . import probe

    print(json.dumps(probe.probe(Path(a.prefix)).to_dict(), indent=2))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .modelinfo import inspect

    info = inspect(Path(a.model))
    print(json.dumps(info.to_dict(), indent=2))
    return 0


SIZE_RE = r"^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|K|M|G|T)?$"
UNITS = {None: 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "KB": 10**3, "M": 1 << 20, "MiB": 1 << 20, "MB": 10**6,
         "G": 1 << 30, "GiB": 1 << 30, "GB": 10**9, "T": 1 << 40, "TiB": 1 << 40, "TB": 10**12}


def parse_size(text: str, what: str) -> int:
    import re

    m = re.match(SIZE_RE, text.strip())
    if not m:
        raise BundlerError(f"{what}: cannot read {text!r} as a size", hint="write e.g. 80GiB, 512GiB or 24576MiB")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def parse_gpus(spec_text: str, driver: str) -> tuple[list, str]:
    """`none` or COUNTxMEMORY[@CC][,nvlink] → ([Gpu], links)."""
    import re

    from .probe import Gpu

    text = spec_text.strip().lower()
    if text in ("none", "0", ""):
        return [], ""
    m = re.match(r"^(\d+)x([0-9.]+\s*[a-z]*)(?:@(\d+\.\d+))?((?:,[a-z]+)*)$", text)
    if not m:
        raise BundlerError(f"--gpus {spec_text!r} is not COUNTxMEMORY[@CC][,nvlink]",
                           hint="e.g. --gpus 8x80GiB@8.0,nvlink, --gpus 4x24GiB@8.9, or --gpus none")
    count = int(m.group(1))
    mem_text = m.group(2).replace("gib", "GiB").replace("mib", "MiB").replace("gb", "GB").replace("tib", "TiB")
    mib = parse_size(mem_text if mem_text[-1:].isalpha() else mem_text + "GiB", "--gpus") // (1 << 20)
    cc = m.group(3) or "9.0"
    flags = [f for f in m.group(4).split(",") if f]
    bad = [f for f in flags if f not in ("nvlink", "pcie")]
    if bad or count < 1 or count > 64:
        raise BundlerError(f"--gpus {spec_text!r}: unknown flag {bad[0] if bad else ''} or count {count}",
                           hint="flags: nvlink or pcie; count 1..64")
    gpus = [Gpu(i, f"GPU {mib // 1024} GiB (described)", mib, mib, cc, driver) for i in range(count)]
    links = ("nvlink" if "nvlink" in flags else "pcie") if count > 1 else ""
    return gpus, links


def cmd_plan(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from . import planner
    from .modelinfo import inspect
    from .probe import Hardware, load_probe

    if a.box:
        hw = load_probe(a.box, "--box")
    else:
        gpus, links = parse_gpus(a.gpus, a.driver or "999")
        ram = parse_size(a.ram, "--ram") if a.ram else 256 << 30
        hw = Hardware(cpus=a.cpus or 32, ram_total=ram, ram_available=ram, disk_free=1 << 40, disk_path="/",
                      arch="x86_64", cpu_flags=(), glibc="2.39", python="3.12", os="described with --gpus",
                      systemd_pid1=True, gpus=tuple(gpus), gpu_links=links)
    if a.box and (a.ram or a.cpus or a.driver):
        gpus = tuple(replace(g, driver=a.driver) for g in hw.gpus) if a.driver else hw.gpus
        ram = parse_size(a.ram, "--ram") if a.ram else hw.ram_available
        hw = replace(hw, cpus=a.cpus or hw.cpus, ram_available=ram, ram_total=max(ram, hw.ram_total), gpus=gpus)
    intent = planner.Intent(concurrency=a.concurrency, context=a.context)
    if not 1 <= a.servers <= 64:
        raise BundlerError(f"--servers {a.servers} is outside 1..64", hint="e.g. --servers 2")
    results, refused = [], 0
    for m in a.model:
        info = inspect(Path(m))
        name = Path(m).stem if not Path(m).is_dir() else Path(m).name
        try:
            if a.servers > 1:  # one service over several servers like this one (vLLM's own multi-node)
                p = planner.plan_cluster(name, info, [hw] * a.servers, intent)
            else:
                p = planner.plan(name, info, hw, intent, engines_available=planner.ALL_ENGINES)
            results.append(p.to_dict())
            if not a.json:
                _explain(p, a.explain)
        except BundlerError as e:
            refused += 1
            results.append({"model": name, "engine": None, "error": e.message, "hint": e.hint,
                            "tensor_parallel": 0, "data_parallel": 0, "gpu_layers": 0, "total_layers": info.layers,
                            "slots": 0, "context_per_slot": 0, "memory_per_gpu_gib": [], "reasons": [e.message],
                            "rejected": []})
            if not a.json:
                print(f"{name}: refused: {e.message}\n  hint: {e.hint}\n")
    if a.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 3 if refused else 0


def _explain(p, explain: bool) -> None:
    from .engines import get

    summary = get(p.engine).summary
    head = f"{p.model}: {p.engine} ({p.backend})" + (f", {summary(p)}" if summary else "")
    if p.memory_per_gpu_gib:
        head += f"; GiB per GPU {list(p.memory_per_gpu_gib)} of {list(p.usable_per_gpu_gib)}"
    print(head)
    from .planner import explain as why

    for line in why(p, reasons=explain):
        print(line)
    print()


def cmd_plot(a: argparse.Namespace) -> int:
    from . import bench

    reports = []
    for f in a.reports:
        try:
            rep = json.loads(Path(f).read_text())
            rep["levels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BundlerError(f"{f} is not a report from `bundler bench --json` ({e})",
                               hint="bench with --json FILE, then plot those files")
        reports.append((rep.get("label") or rep.get("model") or Path(f).stem, rep))
    if not bench.plot(reports, Path(a.out), a.title):
        raise BundlerError("matplotlib is not installed here: no plot written", hint="pip install matplotlib")
    print(f"wrote {a.out}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from . import bench

    key = a.api_key or ""
    if a.api_key_file:
        try:
            text = Path(a.api_key_file).read_text()
        except (OSError, UnicodeError) as e:
            raise BundlerError(f"--api-key-file {a.api_key_file}: cannot be read ({getattr(e, 'strerror', e)})",
                               hint="give the service's env file (install.sh printed its path; reading it may "
                                    "need sudo), or --api-key")
        key = next((line.split("=", 1)[1].strip() for line in text.splitlines()
                    if line.startswith(("LLAMA_API_KEY=", "VLLM_API_KEY=", "API_KEY="))), text.strip())
    try:
        levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        raise BundlerError(f"--concurrency {a.concurrency!r}: give numbers", hint="e.g. --concurrency 1,8,50")
    if not levels or min(levels) < 1:
        raise BundlerError("--concurrency needs numbers >= 1", hint="e.g. --concurrency 1,50")
    report = bench.sweep(a.url, key, a.model, levels, a.requests, a.prompt_tokens, a.max_tokens, a.timeout,
                         min_requests=a.min_requests)
    report["label"] = a.label or a.model
    print(bench.table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")
    if a.plot:
        if bench.plot([(report["label"], report)], Path(a.plot), f"{report['label']} under load"):
            print(f"wrote {a.plot}")
        else:
            log("warning: matplotlib is not installed here: no plot written (the JSON has every figure)")
    bad = sum(r["errors"] for r in report["levels"])
    if bad:
        raise BundlerError(f"{bad} request(s) failed", hint="see the first error above and the server's log")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    p = argparse.ArgumentParser(prog="bundler", description="Bundle an LLM service for an offline box.")
    p.add_argument("--version", action="version", version=f"airgap-llm bundler {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="build a bundle from a spec (make bundle)")
    b.add_argument("spec", nargs="?", default="bundle.toml", help="bundle spec (TOML), default bundle.toml")
    b.add_argument("--out", default="dist", help="output directory (default dist/)")
    b.add_argument("--target", help="probe file of the box (./install.sh --probe): bundle for its Python, glibc, "
                                    "GPUs")
    b.add_argument("--reuse-installed", action="store_true",
                   help="with --target: carry only what the box's python lacks (e.g. vLLM over its torch)")
    b.add_argument("--upgrade-models", action="store_true",
                   help="resolve hf:// and modelscope:// repositories again (their branch or tag may have moved) "
                        "instead of reusing the commits and files pinned in SPEC.models.lock")
    b.add_argument("--part-size", help="split files larger than this (e.g. 60M) for size-limited transfers")
    b.add_argument("--base", metavar="OLD_BUNDLE",
                   help="make a delta bundle: carry only the files this earlier bundle (its folder or manifest.json) "
                        "lacks; on the box, install.sh --base takes the others from that bundle's folder")
    b.add_argument("--unsigned", action="store_true", help="do not sign the manifest (boxes will refuse it unless "
                   "their installer is given --allow-unsigned)")
    k = sub.add_parser("keygen", help="make the Ed25519 key that signs bundles (in ~/.config/airgap-llm)")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    k.set_defaults(func=cmd_keygen)
    b.set_defaults(func=cmd_bundle)
    u = sub.add_parser("unpack", help="check a bundle tar against its manifest, then extract it safely")
    u.add_argument("tar")
    u.add_argument("dest", nargs="?", default=".")
    u.set_defaults(func=cmd_unpack)
    c = sub.add_parser("check", help="check a spec whole, before any download or build (seconds)")
    c.add_argument("spec", nargs="?", default="bundle.toml", help="bundle spec (TOML), default bundle.toml")
    c.add_argument("--target", help="the box's probe file (./install.sh --probe > box.json there)")
    c.add_argument("--reuse-installed", action="store_true", help="as make bundle REUSE=1")
    c.add_argument("--offline", action="store_true", help="skip asking each source whether it has the model")
    c.set_defaults(func=cmd_check)
    v = sub.add_parser("verify", help="check a bundle (directory or tar) against its manifest")
    v.add_argument("path")
    v.add_argument("--trust", action="append", default=[], metavar="KEY.pub",
                   help="also check manifest.json's signature with this public key (a directory or a tar)")
    v.set_defaults(func=cmd_verify)
    pr = sub.add_parser("probe", help="print this machine's facts as JSON")
    pr.add_argument("--prefix", default="/", help="where free disk is measured")
    pr.set_defaults(func=cmd_probe)
    pl = sub.add_parser("plan", help="plan the engine for a model on a box (real or described)",
                        description="Plan which engine serves each model on a box, with what parameters, and why. "
                                    "Exit 3 when a model cannot be served there.")
    pl.add_argument("--model", action="append", required=True,
                    help="GGUF file, HF/EXL2 model directory (config.json + safetensors or their index), or "
                         "a JSON file from `bundler inspect`; repeat for several")
    where = pl.add_mutually_exclusive_group(required=True)
    where.add_argument("--box", help="probe file (./install.sh --probe, bundler probe)")
    where.add_argument("--gpus", help="describe a box: none, or COUNTxMEMORY[@CC][,nvlink], e.g. 8x80GiB@8.0,nvlink")
    pl.add_argument("--ram", help="RAM available, e.g. 512GiB (default 256GiB with --gpus)")
    pl.add_argument("--cpus", type=int, help="CPU cores (default 32 with --gpus)")
    pl.add_argument("--driver", help="NVIDIA driver version, e.g. 580.65 (default: new enough)")
    pl.add_argument("--servers", type=int, default=1, metavar="N",
                    help="plan one service over N servers like the one described (vLLM's multi-node: data parallel "
                         "across them where one holds the model, else tensor parallel within × pipeline parallel "
                         "across); what fits, and what would if it does not. Pass the bundle's --concurrency and "
                         "--context: install.sh --nodes plans with them (README: several servers)")
    pl.add_argument("--concurrency", type=int, default=4, help="requests served at once (default 4)")
    pl.add_argument("--context", type=int, default=4096, help="tokens per request (default 4096)")
    out = pl.add_mutually_exclusive_group()
    out.add_argument("--explain", action="store_true", help="say why, and why not the other engines")
    out.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)
    be = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint",
                        description="Send N streamed chat requests at each concurrency level; report output tok/s, "
                                    "time to first token and latency p50/p95, and errors.")
    be.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    be.add_argument("--model", required=True, help="model name the server serves")
    be.add_argument("--api-key", help="API key (or --api-key-file)")
    be.add_argument("--api-key-file", help="file holding the key (an airgap-llm env file works)")
    be.add_argument("--concurrency", default="1,8", help="levels, comma-separated (default 1,8)")
    be.add_argument("--requests", type=int, help="requests per level (default: the concurrency, at least "
                                                 "--min-requests)")
    be.add_argument("--min-requests", type=int, default=4,
                    help="requests at a level below this concurrency (default 4; one wave above it)")
    be.add_argument("--prompt-tokens", type=int, default=400, help="prompt length in tokens (default 400)")
    be.add_argument("--max-tokens", type=int, default=512, help="output tokens per request (default 512)")
    be.add_argument("--timeout", type=float, default=600, help="seconds per request (default 600)")
    be.add_argument("--label", help="name for this run in the JSON and plot")
    be.add_argument("--json", help="write the report here")
    be.add_argument("--plot", help="write a PNG of tok/s against concurrency here")
    be.set_defaults(func=cmd_bench)
    pl = sub.add_parser("plot", help="plot saved bench reports together (tok/s against concurrency)",
                        description="One line per report from `bundler bench --json`, labelled with its --label.")
    pl.add_argument("reports", nargs="+", help="JSON reports")
    pl.add_argument("--out", required=True, help="PNG to write")
    pl.add_argument("--title", default="throughput under load", help="the plot's title")
    pl.set_defaults(func=cmd_plot)
    i = sub.add_parser("inspect", help="print a model's facts as JSON (GGUF file or HF/EXL2 directory)")
    i.add_argument("model")
    i.set_defaults(func=cmd_inspect)
    a = p.parse_args(argv)
    try:
        return a.func(a)
    except BundlerError as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one boundary: no traceback reaches a user
        from .errors import unexpected

        return unexpected(e, "bundler")


if __name__ == "__main__":
    sys.exit(main())
