"""`./install.sh` → python -m bundler.box: parse the options once, run one flow, print the result."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..errors import BundlerError, report
from . import lifecycle, options


def print_summary(s: dict[str, Any]) -> None:
    lines = [
        "",
        f"airgap-llm is serving {s['model']} with {s['engine']}" + ("" if s["changed"] else " (unchanged)"),
        f"  endpoint:     {s['endpoint']}",
        f"  API key in:   {s['api_key_file']}",
        f"  service:      {s['service']}",
        f"  control:      {s['ctl']} start|stop|restart|status|logs",
        f"  stop with:    {s['stop_command']}",
        f"  try it:       {s['curl']}",
    ]
    if s.get("answer"):
        lines.append(f"  model said:   {s['answer']}")
    print("\n".join(lines))


def run(opts: options.Options) -> dict[str, Any] | None:
    if opts.action == "probe":
        from .. import probe
        from .options import DEFAULT_PREFIX
        from pathlib import Path

        print(json.dumps(probe.probe(opts.prefix or Path(DEFAULT_PREFIX)).to_dict(), indent=2))
        return None
    if opts.action == "uninstall":
        lifecycle.uninstall(opts)
        return None
    if opts.action == "rollback":
        return lifecycle.rollback(opts)
    return lifecycle.install(opts)


def _forget_boot_copies() -> None:
    """bootstrap.py started us from checked copies of our wheels in a temporary folder: remove it
    when we end."""
    import atexit
    import os
    import shutil
    import tempfile

    d = os.environ.pop("AIRGAP_LLM_BOOT_DIR", "")
    if d and os.path.basename(d).startswith("airgap-llm-boot-") and os.path.dirname(d) == tempfile.gettempdir():
        atexit.register(shutil.rmtree, d, True)


def main(argv: list[str] | None = None) -> int:
    _forget_boot_copies()
    opts = options.parse(argv)
    try:
        result = run(opts)
    except BundlerError as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        if opts.json:
            print(json.dumps(result, indent=2))
        else:
            print_summary(result)
    return 0
