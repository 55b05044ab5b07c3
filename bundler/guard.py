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
    return True


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
    subprocess.run([a.ctl, "stop"], capture_output=True)  # whatever holds the pid file (maybe the new one)
    subprocess.run([a.ctl, "start"], capture_output=True)
    if a.remove and os.path.isdir(a.remove):
        shutil.rmtree(a.remove, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
