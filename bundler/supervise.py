"""A small process supervisor for boxes where systemd is not PID 1 (containers,
GPU test machines): runs one command, restarts it when it dies (with backoff,
like systemd's Restart=on-failure), forwards SIGTERM/SIGINT and removes its pid
file on the way out.

    python -m bundler.supervise [--daemon] --pidfile P --log L [--env-file F] [--user U] -- COMMAND…

--env-file: KEY=VALUE lines added to the command's environment (parsed, never executed).
--user: run the command as that account (the supervisor itself stays with the caller, so that
it can keep its pid file and log where the engine cannot write); root never runs the engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .files import atomic_write


def _prctl():
    """libc's prctl, looked up in the supervisor: the child, already the engine's account, may not
    be able to read the Python installation to import ctypes."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, even by SIGKILL (Linux prctl), so an
    engine is never left holding the port without a supervisor."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _log(log, msg: str) -> None:
    log.write(f"[supervise {time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")
    log.flush()


def _engine_env(env_file: str, user: str, home: str = "") -> tuple[dict[str, str], dict]:
    """The command's environment and the Popen arguments that drop to `user`."""
    from . import envfile

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the supervisor's own; an engine that needs one sets it in its launch script
    if env_file:
        env.update(envfile.read(Path(env_file)))
    drop: dict = {}
    if user:
        import pwd

        pw = pwd.getpwnam(user)
        drop = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # a home it can write (engines keep caches under ~/.cache, ~/.triton, ...): its cache folder
        env.update(HOME=home or (pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"), USER=user, LOGNAME=user)
    return env, drop


def _open_log(logpath: str):
    fd = os.open(logpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    os.fchmod(fd, 0o640)
    return os.fdopen(fd, "a", buffering=1)


def run(cmd: list[str], pidfile: str, logpath: str, env_file: str = "", user: str = "", home: str = "") -> int:
    log = _open_log(logpath)
    env, drop = _engine_env(env_file, user, home)
    stopping = False
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    atomic_write(pidfile, f"{os.getpid()}\n".encode())
    backoff = 1.0
    restarts = 0
    try:
        os.unlink(f"{pidfile}.restarts")
    except FileNotFoundError:
        pass
    try:
        while not stopping:
            started = time.monotonic()
            _log(log, "starting: " + " ".join(cmd))
            # its own process group: what it starts (a bundle's several engines, vLLM's workers) can be
            # killed with it if it does not stop in time
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent, env=env, cwd="/", start_new_session=True, **drop)
            # polled, not waited on: a blocking wait is resumed after the signal handler, so a command
            # that ignores SIGTERM would hold the supervisor forever and never reach the kill below
            while child.poll() is None and not stopping:
                time.sleep(0.2)
            if stopping:
                break
            rc = child.returncode
            if time.monotonic() - started > 60:
                backoff = 1.0
            restarts += 1
            with open(f"{pidfile}.restarts", "w") as f:  # the installer reads this: a crashed start
                f.write(f"{restarts} {rc}\n")
            _log(log, f"exited with status {rc}; restarting in {backoff:.0f}s")
            deadline = time.monotonic() + backoff
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
            backoff = min(backoff * 2, 30.0)
        if child and child.poll() is None:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _log(log, "did not stop within 20s; killing it and everything it started")
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()
        _log(log, "stopped")
    finally:
        try:
            with open(pidfile) as f:
                if f.read().strip() == str(os.getpid()):
                    os.unlink(pidfile)
                    if os.path.exists(f"{pidfile}.restarts"):
                        os.unlink(f"{pidfile}.restarts")
        except FileNotFoundError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundler.supervise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pidfile", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--daemon", action="store_true", help="detach (new session) and return at once")
    p.add_argument("--env-file", default="", help="KEY=VALUE lines for the command's environment")
    p.add_argument("--user", default="", help="run the command as this account")
    p.add_argument("--home", default="", help="with --user: its HOME (a folder it can write)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("no command given after --")
    if a.daemon:
        args = [sys.executable, "-S", "-m", "bundler.supervise", "--pidfile", a.pidfile, "--log", a.log,
                "--env-file", a.env_file, "--user", a.user, "--home", a.home, "--", *cmd]
        with open(os.devnull, "rb") as dn, _open_log(a.log) as lg:
            proc = subprocess.Popen(args, stdin=dn, stdout=lg, stderr=lg, start_new_session=True,
                                    close_fds=True, cwd="/")
        # wait until the pid file names the supervisor, so callers can rely on it
        for _ in range(100):
            try:
                with open(a.pidfile) as f:
                    if f.read().strip() == str(proc.pid):
                        return 0
            except FileNotFoundError:
                pass
            if proc.poll() is not None:
                print(f"supervisor exited at once; see {a.log}", file=sys.stderr)
                return 1
            time.sleep(0.05)
        return 0
    return run(cmd, a.pidfile, a.log, a.env_file, a.user, a.home)


if __name__ == "__main__":
    sys.exit(main())
