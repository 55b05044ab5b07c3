"""Who listens on the service's port: the key is sent only to the engine this installer started.

A local user who binds the port first (while the installer holds its lock, or during a restart)
would otherwise receive the API key in the smoke test and every client's key afterwards. Linux
says who owns a listening socket: /proc/net/tcp{,6} name its inode, /proc/PID/fd the process
holding it. Ours is a process under the service's supervisor (its pid file) or in its systemd
unit's cgroup. Standard library only; `python -m bundler.box.listener` is what `ctl status` runs.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from pathlib import Path
from typing import Callable, Optional


def _listening_inodes(port: int) -> list[int]:
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.append(int(f[9]))
    return found


def _owners(inodes: list[int]) -> dict[int, int]:
    """{socket inode: pid holding it}, for the processes this user may look into (root: all)."""
    want = {f"socket:[{i}]": i for i in inodes}
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{d}/fd/{fd}")
            except OSError:
                continue
            if link in want:
                out.setdefault(want[link], int(d))
        if len(out) == len(want):
            break
    return out


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def describe(pid: int) -> str:
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        user = pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        user = "?"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid} (user {user}: {cmd[:120]})"


def under(root_pid: int) -> Callable[[int], bool]:
    """Ours: `root_pid` or a process below it (the supervisor and the engines it started)."""
    def ours(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == root_pid:
                return True
            pid, seen = _ppid(pid), seen + 1
        return False
    return ours


def unit_cgroup(unit: str) -> str:
    """The unit's own control group as systemd names it (/system.slice/UNIT): a user's
    `systemd-run --user --unit=UNIT` ends with the same name under user.slice."""
    import subprocess

    try:
        out = subprocess.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or f"/system.slice/{unit}"


def in_unit(unit: str) -> Callable[[int], bool]:
    """Ours: a process in exactly the systemd unit's control group (or one below it)."""
    group = unit_cgroup(unit)

    def ours(pid: int) -> bool:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False
        paths = [line.split(":", 2)[2].rstrip() for line in text.splitlines() if line.count(":") >= 2]
        return any(p == group or p.startswith(group + "/") for p in paths)
    return ours


def stranger(port: int, ours: Callable[[int], bool]) -> str:
    """'' when every socket listening on `port` belongs to one of ours, else who holds it."""
    inodes = _listening_inodes(port)
    if not inodes:
        return f"nothing listens on port {port}"
    owners = _owners(inodes)
    for inode in inodes:
        pid = owners.get(inode)
        if pid is None:
            return f"port {port} is held by a process this user cannot see (another user's)"
        if not ours(pid):
            return f"port {port} is held by {describe(pid)}, not by this service"
    return ""


def holder(port: int) -> str:
    """Who listens on `port`, for a message ('' if nobody or unknown)."""
    inodes = _listening_inodes(port)
    owners = _owners(inodes)
    return ", ".join(describe(p) for p in sorted(set(owners.values())))


def require_ours(layout, mode: str, ports: list[int]) -> None:
    """Refuse to send the key to a port another program holds (one that bound it first). `layout`:
    the service's (its pid file, its unit)."""
    from ..errors import BundlerError

    if mode == "systemd":
        ours = in_unit(layout.unit)
    else:
        pid = supervisor_pid(layout.pidfile)
        ours = under(pid) if pid else (lambda _pid: False)
    for port in ports:
        why = stranger(port, ours)
        if why:
            raise BundlerError(f"{why}; the API key was not sent to it", hint="stop that program, or install with "
                               "another --port")


def supervisor_pid(pidfile: Path) -> Optional[int]:
    """The service's supervisor by its pid file, if that process is still our supervisor for that pid
    file (a stale file whose pid was reused by another program names nobody)."""
    try:
        pid = int(pidfile.read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"bundler.supervise" not in cmd or str(pidfile).encode() not in cmd:
        return None
    return pid


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundler.box.listener",
                                description="exit 0 if the service's own engine holds every listening socket on PORT")
    p.add_argument("--port", type=int, action="append", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--pidfile", type=Path)
    g.add_argument("--unit")
    a = p.parse_args(argv)
    if a.unit:
        ours = in_unit(a.unit)
    else:
        pid = supervisor_pid(a.pidfile)
        if pid is None:
            print(f"no supervisor pid in {a.pidfile}", file=sys.stderr)
            return 3
        ours = under(pid)
    for port in a.port:
        why = stranger(port, ours)
        if why:
            print(why, file=sys.stderr)
            return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
