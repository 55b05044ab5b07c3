"""One service over several servers (install.sh --nodes A,B,...): which of them this one is, the
interface its engine's cluster traffic takes, the checks before anything changes, and the facts the
release's cluster_node answers its peers with (bundler/cluster_node.py).

The same command runs on every server: `--nodes` lists the servers' addresses on their private
network, the head (which serves the API) first. Each finds its own rank by the address it holds.
Workers are installed first (their engines wait for the head); the head's install asks each worker
before it changes anything, and refuses naming any that does not answer as one of this service.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Any

from .. import cluster_node
from ..contract.trust import read_once
from ..errors import BundlerError
from .preflight import check_port

DEFAULT_PORT = 29501  # vLLM's --master-port default; the check port is the next one
SIOCGIFADDR, SIOCGIFCONF = 0x8915, 0x8912
HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[str, ...]  # the servers' addresses, the head first
    rank: int
    port: int  # the engine's rendezvous (vLLM's --master-port) on the head
    interface: str  # this server's interface that holds nodes[rank]

    @property
    def address(self) -> str:
        return self.nodes[self.rank]

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def check_port(self) -> int:
        return self.port + 1

    @property
    def role(self) -> str:
        return "head" if self.rank == 0 else f"worker {self.rank}"


def local_addresses() -> dict[str, str]:
    """IPv4 address → interface (its label: eth0:1 for a second address), every one this server holds,
    read from the kernel (SIOCGIFCONF) with no `ip` needed."""
    import array

    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        buf = array.array("B", bytes(40 * 256))  # struct ifreq is 40 bytes on 64-bit Linux
        try:
            got = fcntl.ioctl(s.fileno(), SIOCGIFCONF, struct.pack("iL", len(buf), buf.buffer_info()[0]))
            size = struct.unpack("iL", got)[0]
            raw = buf.tobytes()[:size]
            for i in range(0, size - 39, 40):
                out[socket.inet_ntoa(raw[i + 20:i + 24])] = raw[i:i + 16].split(b"\0", 1)[0].decode()
        except OSError:  # where SIOCGIFCONF does not answer: each interface's first address
            for _, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue  # no IPv4 address
                out.setdefault(socket.inet_ntoa(raw[20:24]), name)
    return out


def resolve(nodes: str, rank: int | None, port: int | None, have: dict[str, str] | None = None) -> Cluster:
    """--nodes/--node-rank/--cluster-port checked against this server's addresses."""
    addrs = tuple(a.strip() for a in nodes.split(",") if a.strip())
    if len(addrs) < 2:
        raise BundlerError(f"--nodes {nodes!r}: list two servers or more, the head first (e.g. --nodes "
                           "10.0.0.1,10.0.0.2)", hint="for one server, leave --nodes out")
    for a in addrs:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            raise BundlerError(f"--nodes: {a!r} is not an IP address", hint="give each server's address on the "
                               "private network the servers share (names would need a resolver)") from None
        if ip.version != 4 or ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_reserved \
                or ip.is_link_local or a == "255.255.255.255":
            raise BundlerError(f"--nodes: {a} cannot be a server's address here (loopback, link-local, multicast, "
                               "broadcast and reserved addresses are not a network the servers share)",
                               hint="give each server's IPv4 address on the private network the servers share")
    if len(set(addrs)) != len(addrs):
        raise BundlerError(f"--nodes {nodes!r} names a server twice", hint="list each server once")
    have = local_addresses() if have is None else have
    mine = [i for i, a in enumerate(addrs) if a in have]
    if rank is None:
        if len(mine) != 1:
            held = ", ".join(f"{a} ({i})" for a, i in sorted(have.items())) or "none"
            raise BundlerError(("none of" if not mine else "more than one of") + f" --nodes {','.join(addrs)} is an "
                               f"address of this server (it has: {held})",
                               hint="list the servers' addresses on their shared network, or say which this one is "
                                    "with --node-rank")
        rank = mine[0]
    if not 0 <= rank < len(addrs):
        raise BundlerError(f"--node-rank {rank}: --nodes lists {len(addrs)} servers (ranks 0 to {len(addrs) - 1})",
                           hint="rank 0 is the head, the first address")
    if addrs[rank] not in have:
        raise BundlerError(f"--node-rank {rank} is {addrs[rank]}, which is not an address of this server",
                           hint="run the command on that server, or give this server's rank")
    port = DEFAULT_PORT if port is None else port
    if not 1024 <= port <= 65534:
        raise BundlerError(f"--cluster-port {port}: give a port in 1024..65534 (it and the next one are used)",
                           hint=f"the default is {DEFAULT_PORT}")
    return Cluster(addrs, rank, port, have[addrs[rank]])


def hosts_missing(c: Cluster, hosts: str) -> list[str]:
    """The /etc/hosts lines this server lacks for torch to name its peers without DNS. torch's rendezvous
    (c10d) names every connection's address with getnameinfo, and accepts and connects on IPv6 sockets:
    the address it asks for is the IPv4-mapped ::ffff:A, which only an entry of that form answers from
    the file (an `A name` entry does not). Unanswered, each engine process asks the site's resolver for
    A's reverse name once (10 s where no resolver answers) before it gives names up. Read, never asked:
    asking would be the lookup itself."""
    have, names = set(), {}  # names: what the file already calls an address, suggested for its mapped form
    for line in hosts.split("\n"):  # as glibc reads it: lines end at \n, fields part at spaces and tabs
        fields = [f for f in re.split(r"[ \t]+", line.split("#", 1)[0].strip(" \t")) if f]
        try:
            address = ipaddress.ip_address(fields[0]) if len(fields) >= 2 else None
        except ValueError:
            continue
        if address is not None:
            have.add(address)
            if HOSTNAME.match(fields[1]):  # a name only: the note is printed, and pasted on every server
                names.setdefault(str(address), fields[1])
    return [f"::ffff:{a} {names.get(a, f'airgap-node-{k}')}" for k, a in enumerate(c.nodes)
            if ipaddress.ip_address(f"::ffff:{a}") not in have]


def hosts_note(c: Cluster, path: str = "/etc/hosts") -> str:
    """One line for the installer to print where /etc/hosts lacks the peers' names; empty where it has them."""
    try:  # a regular file only (a link is followed to it): a FIFO or a terminal there would hang the install
        text = read_once(os.path.realpath(path), 1 << 20).decode("utf-8", errors="replace")
    except OSError:
        text = ""
    missing = hosts_missing(c, text)
    if not missing:
        return ""
    return (f"torch asks DNS for the name of each cluster address once per engine process (10 s where no DNS "
            f"answers, and a lookup the egress audit records); to answer from this server, add to {path} on "
            f"every server: " + "; ".join(missing))


def plan_key(plan: Any) -> str:
    """What every server of one service must plan alike (not threads or free RAM, which may differ)."""
    keep = ("engine", "backend", "tensor_parallel", "pipeline_parallel", "data_parallel", "nodes", "max_model_len",
            "max_num_seqs", "gpu_memory_utilization", "context_per_slot", "slots")
    d = plan.to_dict()
    return hashlib.sha256(json.dumps({k: d.get(k) for k in keep}, sort_keys=True).encode()).hexdigest()[:16]


def gpus_of(hw: Any) -> str:
    g = hw.gpus
    return f"{len(g)} × {g[0].name} ({g[0].memory_total_mib} MiB)" if g else "no GPU"


def facts(c: Cluster, manifest_sha: str, model: dict[str, Any], plan: Any, hw: Any, release: str) -> dict[str, Any]:
    """What the release's cluster_node answers with, and compares its workers' answers to."""
    return {"nodes": list(c.nodes), "rank": c.rank, "address": c.address, "check_port": c.check_port,
            "bundle": manifest_sha, "model": f"{model['name']} {model.get('sha256') or model['file']}",
            "plan": f"{plan_key(plan)} on {gpus_of(hw)}", "release": release, "wait_s": 600}


def check_ports_free(c: Cluster) -> None:
    """The ports this server will hold for the cluster are free on its cluster address (naming who holds
    one, as for the API's port); the next pair is suggested, for every server."""
    for p in [c.check_port] + ([c.port] if c.rank == 0 else []):
        check_port(c.address, p, False, "--cluster-port", c.port + 2)


def check_workers(c: Cluster, mine: dict[str, Any]) -> None:
    """On the head, before anything changes: every worker answers as one of this service."""
    if c.rank != 0:
        return
    probs = [p for r, a in cluster_node.workers(mine) if (p := cluster_node.problem(mine, r, a))]
    if probs:
        raise BundlerError("; ".join(probs) + "; nothing was changed on this server (the head)",
                           hint="install on every worker first (the same command there), then here")
