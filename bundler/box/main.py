"""`./install.sh` → python -m bundler.box: parse the options once, run one flow, print the result."""

from __future__ import annotations

import json
import os
import shlex
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
        f"  control:      {shlex.quote(s['ctl'])} start|stop|restart|status|logs [-f]",
        f"  stop with:    {s['stop_command']}",
        f"  try it:       {s['curl']}",
    ]
    for o in s.get("models", [])[1:]:
        lines.append(f"  also:         {o['model']} ({o['task']}, {o['engine']}) at {o['endpoint']}, the same key")
    if s.get("answer"):
        lines.append(f"  model said:   {s['answer']}")
    for w in s.get("warnings", []):
        lines.append(f"  warning:      {w}")
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
    if opts.action == "list":
        rows = lifecycle.list_services(opts)
        if opts.json:
            print(json.dumps(rows, indent=2))
        else:
            print(lifecycle.services_table(rows))
        return None
    if opts.action == "rollback":
        return lifecycle.rollback(opts)
    return lifecycle.install(opts)


def audit_egress(opts: options.Options, argv: list[str]) -> dict[str, Any]:
    """Run this same install (as a supervised process, with --bench) inside an audited network
    namespace, stop its service, and report every attempt to reach beyond loopback."""
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from .. import egress
    from ..errors import BundlerError
    from .report import info

    if os.geteuid() != 0:
        raise BundlerError("--audit-egress needs root to make the audited network namespace", hint="run it with sudo")
    # iproute2's named namespace where the box has it, else unshare(2) (AIRGAP_LLM_AUDIT=unshare picks it)
    private = not shutil.which("ip") or os.environ.get("AIRGAP_LLM_AUDIT") == "unshare"
    child = [a for a in argv if a != "--audit-egress"] + ["--service", "process", "--json"]
    if "--bench" not in child:
        child.append("--bench")
    from . import boot
    with tempfile.TemporaryDirectory(prefix="airgap-audit-") as td:
        log = Path(td) / "egress.jsonl"
        with (egress.PrivateNetwork(log) if private else egress.AuditedNamespace(log)) as ns:
            info(f"egress audit: install, start, smoke test and bench inside network namespace {ns.name}, whose only "
                 "way out records every attempt")
            # the installer again, from the same checked copies, isolated like the first
            r = subprocess.run(ns.argv([*boot.installer_argv(), *child]), stdout=subprocess.PIPE, text=True,
                               env=boot.installer_env())
            result = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}
            if result.get("ctl"):
                subprocess.run(ns.argv([result["ctl"], "stop"]), stdout=subprocess.DEVNULL)
        attempts = ns.attempts()
    info(egress.summary(attempts))
    if r.returncode != 0 and not attempts:
        raise BundlerError(f"the audited install failed (exit {r.returncode}); no attempt to reach beyond loopback "
                           "was seen", hint="see its messages above")
    if attempts:
        first = attempts[0]
        failed = "" if r.returncode == 0 else f" (the audited install itself failed, exit {r.returncode})"
        raise BundlerError(f"{egress.summary(attempts)}{failed}",
                           hint=f"the first was {first['what']} at {first['time']}; an air-gapped box would hang or "
                                "fail there")
    info("the service ran inside the audit namespace and was stopped with it; install again without --audit-egress "
         "to serve")
    result["egress"] = {"attempts": 0, "namespace": ns.name, "steps": ["install", "start", "smoke", "bench"]}
    return result


def main(argv: list[str] | None = None) -> int:
    from . import boot

    os.umask(0o022)  # what the release holds is read by the engine's user and written by no one else
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        boot.clean_on_exit()
    except BundlerError as e:
        return report(e)
    opts = options.parse(argv)
    try:
        boot.settle()  # options read (relative paths made absolute): from here on, work from the private folder
        result = audit_egress(opts, raw) if opts.audit_egress else run(opts)
    except BundlerError as e:
        if opts.json:  # a script reading stdout learns why, not only that it failed
            print(json.dumps({"error": e.message, "hint": e.hint or ""}))
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one boundary: no traceback reaches a user
        from ..errors import unexpected

        if opts.json:
            print(json.dumps({"error": f"{type(e).__name__}: {e}", "hint": "see the report named on stderr"}))
        return unexpected(e, "install")
    if result is not None:
        if opts.json:
            print(json.dumps(result, indent=2))
        else:
            print_summary(result)
    return 0
