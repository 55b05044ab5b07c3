"""Egress audit: record every attempt to reach beyond loopback, from any process, static binaries
included (standard library only, so it runs on the box).

A network namespace gets loopback and one "uplink" (a veth pair whose other end stays inside the
namespace, unaddressed: a dead end) that carries the default route, through a gateway whose
hardware address is fixed so no packet waits for ARP, and a resolver address
(/etc/netns/NAME/resolv.conf, which `ip netns exec` mounts over /etc/resolv.conf). Nothing sent
there goes anywhere, but a packet socket on it sees each packet leave: a TCP connect shows as a
SYN, a DNS lookup as a UDP query whose name can be read. `watch` writes one JSON line per attempt.
(IPv4: the namespace has no IPv6 route, so an IPv6 connect fails at once, unrecorded.)
Without iproute2, PrivateNetwork does the same with unshare(2) and ioctls: loopback carries the
default route and the watcher reads loopback, skipping what stays on it.

    python -m bundler.egress watch --iface up0 --out FILE     (inside the namespace)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

UPLINK = "up0"
UPLINK_ADDR = "192.0.2.1/32"  # TEST-NET-1: documentation addresses, never routed anywhere real
GATEWAY = "192.0.2.254"
RESOLVER = "192.0.2.53"
ETH_P_ALL = 0x0003


def _dns_name(payload: bytes) -> str:
    """The first question's name of a DNS query ("" if it is not one)."""
    try:
        i, labels = 12, []
        while payload[i]:
            n = payload[i]
            labels.append(payload[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        return ".".join(labels)
    except (IndexError, UnicodeDecodeError):
        return ""


def parse_frame(frame: bytes) -> dict[str, Any] | None:
    """What an Ethernet frame leaving the uplink tried to reach (None for what is no attempt,
    e.g. IPv6 neighbour discovery the kernel sends on its own)."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0800 and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        dst = socket.inet_ntoa(frame[30:34])
        l4 = frame[14 + ihl:]
        if 224 <= frame[30] <= 239:  # multicast (IGMP and the like): the kernel's, not a program's
            return None
    elif ethertype == 0x86DD and len(frame) >= 54:
        proto = frame[20]
        dst = socket.inet_ntop(socket.AF_INET6, frame[38:54])
        l4 = frame[54:]
        if proto in (0, 58) or frame[38] == 0xFF:  # ICMPv6, MLD, multicast: the kernel's, not a program's
            return None
    else:
        return None
    if proto == 6 and len(l4) >= 14:
        port, flags = struct.unpack("!H", l4[2:4])[0], l4[13]
        if flags & 0x02 and not flags & 0x10:  # SYN without ACK: a connect()
            return {"proto": "tcp", "address": dst, "port": port, "what": f"connect to {dst}:{port}"}
        return None
    if proto == 17 and len(l4) >= 8:
        port = struct.unpack("!H", l4[2:4])[0]
        if port == 53:
            name = _dns_name(l4[8:])
            return {"proto": "dns", "address": dst, "port": 53, "name": name, "what": f"DNS lookup of {name!r}"}
        return {"proto": "udp", "address": dst, "port": port, "what": f"UDP to {dst}:{port}"}
    if proto == 1:
        return {"proto": "icmp", "address": dst, "port": 0, "what": f"ping {dst}"}
    return {"proto": str(proto), "address": dst, "port": 0, "what": f"IP protocol {proto} to {dst}"}


def watch(iface: str, out: Path) -> None:
    """Append every attempt seen leaving `iface` to `out` (JSON lines) until SIGTERM."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.settimeout(0.5)
    stop = False

    def _stop(*_a):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with open(out, "a", buffering=1) as f:
        f.write(json.dumps({"ready": True}) + "\n")
        record(s, f, lambda: stop)


def record(s: socket.socket, f: Any, stopped: Any, beyond_loopback: bool = False) -> None:
    """Write one JSON line to f for each attempt leaving through packet socket s, until stopped();
    beyond_loopback: skip what is addressed to loopback (a watcher on lo itself)."""
    while not stopped():
        try:
            frame, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] != socket.PACKET_OUTGOING:
            continue
        seen = parse_frame(frame)
        if seen and not (beyond_loopback and _loopback(seen["address"])):
            seen["time"] = round(time.time(), 3)
            f.write(json.dumps(seen) + "\n")


class AuditedNamespace:
    """A network namespace with loopback, a dummy uplink with the default route and a resolver
    on it, and a watcher recording what leaves. Root and iproute2 are needed."""

    def __init__(self, log: Path, name: str = ""):
        self.name = name or f"airgap-audit-{uuid.uuid4().hex[:8]}"
        self.log = log
        self.watcher: subprocess.Popen | None = None
        self.etc = Path("/etc/netns") / self.name

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "ip", *args], check=True, capture_output=True)

    def __enter__(self) -> AuditedNamespace:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self._ip("link", "set", "lo", "up")
        self._ip("link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK + "p")
        self._ip("addr", "add", UPLINK_ADDR, "dev", UPLINK)
        self._ip("link", "set", UPLINK + "p", "up")
        self._ip("link", "set", UPLINK, "up")
        self._ip("route", "add", GATEWAY, "dev", UPLINK)
        self._ip("route", "add", "default", "via", GATEWAY)
        mac = Path(f"/sys/class/net/{UPLINK}p/address")  # not visible from here: ask inside the namespace
        peer = subprocess.run(["ip", "netns", "exec", self.name, "cat", str(mac)], capture_output=True, text=True,
                              check=True).stdout.strip()
        self._ip("neigh", "add", GATEWAY, "lladdr", peer, "dev", UPLINK, "nud", "permanent")
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        pkg = str(Path(__file__).resolve().parents[1])
        self.watcher = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-S", "-m", "bundler.egress", "watch", "--iface",
             UPLINK, "--out", str(self.log)], env=dict(os.environ, PYTHONPATH=pkg), cwd="/",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):  # until the watcher's socket is open
            if self.log.read_text():
                break
            time.sleep(0.05)
        return self

    def argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def attempts(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            d = json.loads(line)
            if not d.get("ready"):
                out.append(d)
        return out

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)  # the last packets reach the watcher
        if self.watcher is not None:
            self.watcher.terminate()
            try:
                self.watcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        for f in (*self.etc.glob("*"), self.etc):  # resolv.conf, and a hosts file a test put beside it
            try:
                f.unlink() if f.is_file() else f.rmdir()
            except OSError:
                pass


def _loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "0.0.0.0", "::")


class PrivateNetwork:
    """The same audit where iproute2 is missing (minimal installs, the VMs GPU clouds lend): this
    process moves into new network and mount namespaces (unshare(2)), so do the processes it starts;
    loopback comes up and carries the default route, /etc/resolv.conf names a resolver on it
    (a bind mount seen only here), and a thread watching loopback records every packet that leaves
    for an address beyond it. Root is needed; the process cannot leave the namespaces again."""

    name = "private (unshare)"

    def __init__(self, log: Path):
        self.log = log
        self._stop = False
        self._thread: Any = None
        self._keep: list[Any] = []
        self._resolv_dir: Path | None = None

    def __enter__(self) -> PrivateNetwork:
        import ctypes
        import fcntl
        import tempfile
        import threading

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        if libc.unshare(0x40000000 | 0x00020000) != 0:  # CLONE_NEWNET | CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET | CLONE_NEWNS) failed")
        libc.mount(None, b"/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE: no mount leaks out
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ifr = fcntl.ioctl(s, 0x8913, struct.pack("16sh22x", b"lo", 0))  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", b"lo", struct.unpack("16sh22x", ifr)[1] | 1))  # up

        class Sockaddr(ctypes.Structure):
            _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_char * 14)]

        class Rtentry(ctypes.Structure):  # <net/route.h>
            _fields_ = [("pad1", ctypes.c_ulong), ("dst", Sockaddr), ("gateway", Sockaddr), ("genmask", Sockaddr),
                        ("flags", ctypes.c_ushort), ("pad2", ctypes.c_short), ("pad3", ctypes.c_ulong),
                        ("pad4", ctypes.c_void_p), ("metric", ctypes.c_short), ("dev", ctypes.c_char_p),
                        ("mtu", ctypes.c_ulong), ("window", ctypes.c_ulong), ("irtt", ctypes.c_ushort)]

        rt = Rtentry()
        rt.dst.family = rt.gateway.family = rt.genmask.family = socket.AF_INET
        rt.flags, rt.dev = 0x0001, b"lo"  # RTF_UP: everything beyond loopback, into loopback
        fcntl.ioctl(s, 0x890B, bytes(rt))  # SIOCADDRT
        self._keep.append(rt)
        td = self._resolv_dir = Path(tempfile.mkdtemp(prefix="airgap-audit-"))
        (td / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
        if libc.mount(str(td / "resolv.conf").encode(), b"/etc/resolv.conf", None, 0x1000, None) != 0:  # MS_BIND
            raise OSError(ctypes.get_errno(), "could not mount a private /etc/resolv.conf")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        w = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        w.bind(("lo", 0))
        w.settimeout(0.3)
        self._thread = threading.Thread(target=self._watch, args=(w,), daemon=True)
        self._thread.start()
        return self

    def _watch(self, w: socket.socket) -> None:
        with open(self.log, "a", buffering=1) as f:
            record(w, f, lambda: self._stop, beyond_loopback=True)

    def argv(self, cmd: list[str]) -> list[str]:
        return cmd  # the children are in the namespaces already

    def attempts(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)  # the last packets reach the watcher
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._resolv_dir is not None:  # the bind mount keeps its file; the folder is not left in /tmp
            shutil.rmtree(self._resolv_dir, ignore_errors=True)


def summary(attempts: list[dict[str, Any]]) -> str:
    if not attempts:
        return "egress audit: no attempt to reach beyond loopback"
    seen: dict[str, int] = {}
    for a in attempts:
        seen[a["what"]] = seen.get(a["what"], 0) + 1
    return (f"egress audit: {len(attempts)} attempt(s) to reach beyond loopback: "
            + "; ".join(f"{w} (x{n})" if n > 1 else w for w, n in seen.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundler.egress")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--iface", default=UPLINK)
    w.add_argument("--out", required=True)
    a = p.parse_args(argv)
    watch(a.iface, Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
