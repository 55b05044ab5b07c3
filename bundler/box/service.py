"""Step 6: run a release as a service. A hardened systemd unit (DynamicUser) where systemd is
PID 1 and we are root; elsewhere a supervised background process, which as root runs the
engine as an unprivileged system user. Both start the exact release they belong to: each
release's `bin/ctl start` puts its own unit in place (systemd) or its own launch script under
the supervisor (process), so a rollback, or a failed upgrade's way back, starts what it names."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .. import envfile, probe
from ..errors import BundlerError
from ..files import atomic_write
from ..render import render
from .layout import Layout, make_dirs
from .options import DEFAULT_USER, Options
from .report import info


def service_mode(opts: Options, hw: probe.Hardware) -> str:
    if opts.service == "systemd":
        if not hw.systemd_pid1:
            raise BundlerError("--service systemd: systemd is not PID 1 on this box",
                               hint="use --service process (a supervised background process)")
        if os.geteuid() != 0:
            raise BundlerError("--service systemd needs root (the unit goes to /etc/systemd/system)",
                               hint="run it with sudo, or use --service process")
        return "systemd"
    if opts.service == "auto" and hw.systemd_pid1 and os.geteuid() == 0:
        return "systemd"
    return "process"


def engine_user(opts: Options, mode: str) -> str:
    """The account the engine runs as in process mode: none to choose unless we are root."""
    if mode != "process" or os.geteuid() != 0:
        return ""
    return opts.user or DEFAULT_USER


def ensure_user(user: str) -> bool:
    """Make the system account if it is missing (useradd, else adduser). True if made now."""
    import pwd

    try:
        pwd.getpwnam(user)
        return False
    except KeyError:
        pass
    for cmd in (["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                 "--shell", "/usr/sbin/nologin", user],
                ["adduser", "--system", "--group", "--no-create-home", "--home", "/nonexistent",
                 "--shell", "/usr/sbin/nologin", user]):
        if shutil.which(cmd[0]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise BundlerError(f"could not make the system user {user}: {r.stderr.strip()}",
                                   hint="make it yourself, or pass --user ACCOUNT (an existing unprivileged one)")
            info(f"made the system user {user} to run the engine")
            return True
    raise BundlerError(f"the engine must not run as root and the user {user} does not exist; this box has neither "
                       "useradd nor adduser", hint="make an unprivileged account and pass --user ACCOUNT")


def check_reachable(path: Path, user: str) -> None:
    """The engine's account must be able to reach `path` (the prefix): every folder above it
    searchable by that user. Said before any change, not found in a log after the start."""
    import grp
    import pwd
    import stat

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return  # made later by ensure_user; it owns nothing, so the "others" bits decide
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    p = path
    while True:
        if p.exists():
            st = p.stat()
            bit = stat.S_IXUSR if st.st_uid == pw.pw_uid else stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH
            if not st.st_mode & bit:
                raise BundlerError(f"the engine runs as {user}, who cannot reach {path}: {p} is not searchable for it "
                                   f"(mode {stat.S_IMODE(st.st_mode):o}); nothing was changed",
                                   hint=f"chmod o+x {p}, or install into another --prefix, or pass --user ACCOUNT")
        if p.parent == p:
            return
        p = p.parent


def remove_user(user: str) -> None:
    if shutil.which("userdel"):
        subprocess.run(["userdel", user], capture_output=True)
    elif shutil.which("deluser"):
        subprocess.run(["deluser", "--system", user], capture_output=True)


def give_to_user(layout: Layout, user: str) -> None:
    """Process mode as root: the engine's account may write its kernel cache, nothing else."""
    import pwd

    pw = pwd.getpwnam(user)
    make_dirs(layout.cache, 0o700)
    # never through a link: the account owns what is below and could put one there to get /etc chowned
    for root, dirs, files, dfd in os.fwalk(layout.cache, follow_symlinks=False):
        os.chown(dfd, pw.pw_uid, pw.pw_gid)
        for f in [*files, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]:
            os.chown(f, pw.pw_uid, pw.pw_gid, dir_fd=dfd, follow_symlinks=False)


# ---- the key ------------------------------------------------------------------------

def ensure_env_file(layout: Layout) -> str:
    """Create the env file with a fresh API key once; keep the key on later installs."""
    path = layout.env_file
    if path.is_file():
        key = envfile.read(path).get("LLAMA_API_KEY", "")
        if key:
            return key
    key = "sk-" + secrets.token_urlsafe(32)
    make_dirs(path.parent, 0o700)
    atomic_write(path, render("env.j2", {"name": layout.name, "api_key": key}).encode(), 0o600)
    return key


def read_key(layout: Layout) -> str:
    key = envfile.read(layout.env_file).get("LLAMA_API_KEY", "")
    if not key:
        raise BundlerError(f"{layout.env_file} holds no LLAMA_API_KEY", hint="delete it and run install.sh again")
    return key


# ---- start, stop, watch -------------------------------------------------------------

def ctl(release: Path, action: str) -> int:
    return subprocess.run([str(release / "bin" / "ctl"), action], stdout=sys.stderr, stderr=sys.stderr).returncode


# `ctl status`: 0 running, 3 stopped, 4 running while another program holds its port
RUNNING, STOPPED, PORT_TAKEN = 0, 3, 4


def state(release: Path) -> int:
    return subprocess.run([str(release / "bin" / "ctl"), "status"], capture_output=True).returncode


def is_running(release: Path) -> bool:
    """The release's service is up (its own port or not: either way it must be stopped to stop it)."""
    return state(release) in (RUNNING, PORT_TAKEN)


def start(release: Path, mode: str, layout: Layout) -> None:
    if mode == "process":
        make_dirs(layout.pidfile.parent, 0o755)
        make_dirs(layout.logfile.parent, 0o750)
    if ctl(release, "start") != 0:
        raise BundlerError(f"the service did not start (release {release.name})",
                           hint=f"see {layout.log_hint(mode)}")


def engine_alive(release: Path, layout: Layout, mode: str) -> bool:
    """While starting: the service runs and its engine has not died yet (the supervisor and
    systemd would restart it), so a crashed start is seen at once."""
    if mode == "process":
        return is_running(release) and not Path(f"{layout.pidfile}.restarts").exists()
    out = subprocess.run(["systemctl", "show", "-p", "NRestarts", "-p", "ActiveState", layout.unit],
                         capture_output=True, text=True).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return props.get("ActiveState") in ("active", "activating") and props.get("NRestarts", "0") in ("", "0")


def remove_unit(layout: Layout) -> None:
    """Stop, disable and remove the unit (first install failed, or uninstall)."""
    if not layout.unit_file.exists():
        return
    subprocess.run(["systemctl", "disable", "--now", layout.unit], capture_output=True)
    layout.unit_file.unlink()
    subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
    subprocess.run(["systemctl", "reset-failed", layout.unit], capture_output=True)


def stop_command(layout: Layout, mode: str) -> str:
    if mode == "systemd":
        return f"systemctl stop {shlex.quote(layout.unit)}"
    return f"{shlex.quote(str(layout.current / 'bin' / 'ctl'))} stop"
