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

from .errors import BundlerError


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
    s = spec.load(a.spec)
    log(f"bundling {s.name} {s.version} from {a.spec}")
    r = bundle.make(s, Path(a.out), log=log)
    pythons = ", ".join(s.target.pythons)
    print(f"\nbundle ready in {r.seconds:.0f}s: {r.directory} ({_size(r.size)})\n"
          f"  tar: {r.tar} ({_size(r.tar.stat().st_size)})\n"
          f"  the box needs: Linux on this CPU architecture, python3 {pythons}\n"
          f"next: copy {r.tar.name} to the offline box, then:\n"
          f"  tar xf {r.tar.name} && cd {s.name} && sudo ./install.sh   (or ./install.sh --prefix DIR)")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from . import manifest

    t0 = time.monotonic()
    doc, problems = manifest.verify(Path(a.path))
    total = sum(f["size"] for f in doc["files"])
    secs = time.monotonic() - t0
    for p in problems:
        print(p.describe(), file=sys.stderr)
    if problems:
        raise BundlerError(f"{a.path}: {len(problems)} problem(s) found", hint="copy the bundle again from its source")
    print(f"{a.path}: {len(doc['files'])} files, {_size(total)} verified in {secs:.1f}s "
          f"({total / max(secs, 1e-9) / 1e9:.2f} GB/s)")
    return 0


def cmd_probe(a: argparse.Namespace) -> int:
    from . import probe

    print(json.dumps(probe.probe(Path(a.prefix)).to_dict(), indent=2))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .modelinfo import inspect_gguf

    info = inspect_gguf(Path(a.model))
    print(json.dumps(info.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bundler", description="Bundle an LLM service for an offline box.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="build a bundle from a spec (make bundle)")
    b.add_argument("spec", nargs="?", default="bundle.toml", help="bundle spec (TOML), default bundle.toml")
    b.add_argument("--out", default="dist", help="output directory (default dist/)")
    b.set_defaults(func=cmd_bundle)
    v = sub.add_parser("verify", help="check every file of an unpacked bundle against its manifest")
    v.add_argument("path")
    v.set_defaults(func=cmd_verify)
    pr = sub.add_parser("probe", help="print this machine's facts as JSON")
    pr.add_argument("--prefix", default="/", help="where free disk is measured")
    pr.set_defaults(func=cmd_probe)
    i = sub.add_parser("inspect", help="print a GGUF model's facts as JSON")
    i.add_argument("model")
    i.set_defaults(func=cmd_inspect)
    a = p.parse_args(argv)
    try:
        return a.func(a)
    except BundlerError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
