"""Guards an upgrade against the installer dying halfway (killed, power cut of the
shell, OOM): started detached just before the running release is stopped, it
waits for the installer to exit; if the installer did not mark the upgrade done,
it stops whatever now holds the service, restarts the previous release and
removes the half-built one.

    python -m bundler.guard --pid PID --done MARKER --ctl PREVIOUS/bin/ctl [--remove DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _pidfile_of(ctl: str) -> str:
    for line in open(ctl):
        if line.startswith("PIDFILE="):
            return line.split("=", 1)[1].strip().strip("'")
    return ""


def _supervisors(pidfile: str) -> list[int]:
    """Processes running `bundler.supervise --pidfile PIDFILE` (found in /proc)."""
    if not pidfile:
        return []
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"bundler.supervise" in args and pidfile.encode() in args:
            found.append(int(d))
    return found


def _stop_supervisors(pidfile: str) -> bool:
    pids = _supervisors(pidfile)
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 25
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return bool(pids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundler.guard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--done", required=True)
    p.add_argument("--ctl", required=True)
    p.add_argument("--remove", default="")
    a = p.parse_args(argv)
    while _alive(a.pid):
        time.sleep(0.2)
    if os.path.exists(a.done):
        os.unlink(a.done)
        return 0
    # Stop every supervisor of this service, not only the one the pid file names: the dead
    # installer's last `ctl start` may still be starting one. Twice, a second apart.
    pidfile = _pidfile_of(a.ctl)
    for _ in range(3):
        subprocess.run([a.ctl, "stop"], capture_output=True)
        stopped = _stop_supervisors(pidfile)
        time.sleep(1.0)
        if not stopped and not _supervisors(pidfile):
            break
    subprocess.run([a.ctl, "start"], capture_output=True)
    if a.remove and os.path.isdir(a.remove):
        shutil.rmtree(a.remove, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
