"""Real servers for the end-to-end tests: a Debian root booted with systemd as PID 1
(systemd-nspawn), and minimal Debian roots (only python3) entered with chroot inside new
network, mount and pid namespaces. Roots come from tools/debian_root.sh, cached outside
the clone; each test works on a throwaway copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def debian_root(suite: str, include: str = "python3") -> Path:
    """The cached root (made once by debootstrap, 1-2 minutes)."""
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.fail("the real-server tests need root and debootstrap (.ci/run installs it)")
    r = subprocess.run(["sh", str(ROOT / "tools" / "debian_root.sh"), suite, include], capture_output=True,
                       text=True, timeout=1200)
    if r.returncode != 0:
        pytest.fail(f"making a Debian {suite} root failed:\n{r.stderr[-2000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def copy_root(root: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", "--reflink=auto", str(root), str(dest)], check=True)
    return dest


def chroot_run(root: Path, binds: dict[str, str], script: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `script` (sh) inside `root` as root: a network namespace with only loopback (up), its
    own mounts (/proc, /dev, the binds read-only) and its own pids, so whatever it starts ends
    with it. binds: host path → path inside the root."""
    mounts = [f"mount -t proc proc {root}/proc", f"mount --rbind /dev {root}/dev"]
    for host, inside in binds.items():
        target = f"{root}{inside}"
        mounts.append(f"mkdir -p {target} && mount --bind {host} {target} && mount -o remount,bind,ro {target}")
    outer = " && ".join(["ip link set lo up", *mounts,
                         f"exec chroot {root} /usr/bin/env -i PATH={PATH} HOME=/root LANG=C.UTF-8 sh -c \"$0\""])
    return subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "sh", "-c", outer, script],
                          capture_output=True, text=True, timeout=timeout)


class SystemdBox:
    """A throwaway copy of a Debian root booted with systemd as PID 1, with only loopback."""

    def __init__(self, root: Path, binds: dict[str, str]):
        self.root, self.binds = root, binds
        self.name = f"airgap-{uuid.uuid4().hex[:8]}"
        self.log = tempfile.NamedTemporaryFile(prefix="nspawn-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0

    def __enter__(self) -> SystemdBox:
        if not shutil.which("systemd-nspawn"):
            pytest.fail("the systemd tests need systemd-nspawn (.ci/run installs systemd-container)")
        cmd = ["systemd-nspawn", "-x", "-b", "-D", str(self.root), "--private-network", "--register=no",
               "--keep-unit", "--console=passive", "-M", self.name,
               *[f"--bind-ro={h}:{c}" for h, c in self.binds.items()]]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_booted(time.monotonic() + 180)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_booted(self, deadline: float) -> None:
        state = ""
        while state not in ("running", "degraded"):
            # the container's init is nspawn's child named systemd; nspawn forks a short-lived helper
            # first, which must not be taken for it
            self.pid1 = next((int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == self.proc.pid
                              and _comm(int(p)) == "systemd"), 0)
            if self.pid1:
                state = self.run(["systemctl", "is-system-running"], timeout=30).stdout.strip()
            self._check_alive(deadline)

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("the systemd container did not boot:\n" + Path(self.log.name).read_text()[-3000:])
        time.sleep(0.2)

    def run(self, cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "/usr/bin/env", "-i", f"PATH={PATH}",
                               "HOME=/root", "LANG=C.UTF-8", *cmd], timeout=timeout, **kw)

    def sh(self, script: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], timeout=timeout)

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        if self.proc.poll() is None and self.pid1:
            self.run(["systemctl", "poweroff"], timeout=30)
        elif self.proc.poll() is None:
            self.proc.terminate()  # nspawn powers the container off
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"):
            for d in ("supervisor", "payload"):
                try:
                    os.rmdir(f"{base}/{d}")
                except OSError:
                    pass
        for left in self.root.parent.glob(f".#machine.{self.root.name}*"):  # a killed nspawn's copy or lock
            shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink()
        os.unlink(self.log.name)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
