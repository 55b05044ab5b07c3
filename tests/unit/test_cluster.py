"""install.sh --nodes: which server this is, what its peers must agree on, and what vLLM is started
with on each (the two-server e2e test is tests/e2e/test_cluster.py)."""

import json
import subprocess
import sys
import time

import pytest

from bundler import cluster_node
from bundler.box import cluster, options
from bundler.errors import BundlerError

HAVE = {"127.0.0.1": "lo", "10.0.0.2": "eth1"}


def test_each_server_finds_its_rank_by_the_address_it_holds():
    c = cluster.resolve("10.0.0.1, 10.0.0.2", None, None, HAVE)
    assert (c.rank, c.interface, c.head, c.port, c.check_port, c.role) == (1, "eth1", "10.0.0.1", 29501, 29502,
                                                                          "worker 1")
    assert cluster.resolve("10.0.0.1,10.0.0.2", 1, 30000, HAVE).port == 30000


@pytest.mark.parametrize("nodes, rank, port, message", [
    ("10.0.0.2", None, None, "list two servers or more"),
    ("10.0.0.1,head.local", None, None, "'head.local' is not an IP address"),
    ("10.0.0.1,0.0.0.0", None, None, "0.0.0.0 cannot be a server's address"),
    ("127.0.0.1,127.0.0.2", 0, None, "127.0.0.1 cannot be a server's address"),
    ("10.0.0.1,169.254.1.2", None, None, "169.254.1.2 cannot be a server's address"),
    ("10.0.0.1,255.255.255.255", None, None, "255.255.255.255 cannot be a server's address"),
    ("10.0.0.1,10.0.0.2", None, 0, "--cluster-port 0"),
    ("10.0.0.1,10.0.0.1", None, None, "names a server twice"),
    ("10.0.0.1,10.0.0.3", None, None, "none of --nodes 10.0.0.1,10.0.0.3 is an address of this server (it has: "
                                      "10.0.0.2 (eth1), 127.0.0.1 (lo))"),
    ("10.0.0.1,10.0.0.2", 2, None, "--node-rank 2: --nodes lists 2 servers"),
    ("10.0.0.1,10.0.0.2", 0, None, "--node-rank 0 is 10.0.0.1, which is not an address of this server"),
    ("10.0.0.1,10.0.0.2", None, 80, "--cluster-port 80"),
])
def test_a_cluster_that_cannot_be_is_refused_naming_why(nodes, rank, port, message):
    with pytest.raises(BundlerError) as e:
        cluster.resolve(nodes, rank, port, HAVE)
    assert message in e.value.message


def test_this_servers_addresses_are_read_without_ip():
    assert cluster.local_addresses()["127.0.0.1"] == "lo"


def test_cluster_options_go_together(capsys):
    for argv, said in ([["--node-rank", "1"], "go with --nodes"], [["--nodes", "10.0.0.1,10.0.0.2", "--tune"],
                                                                    "--tune does not go with --nodes"]):
        with pytest.raises(SystemExit):
            options.parse(["--bundle", "/b", *argv])
        assert said in capsys.readouterr().err
    o = options.parse(["--bundle", "/b", "--nodes", "10.0.0.1,10.0.0.2", "--cluster-port", "30000"])
    assert (o.nodes, o.cluster_port, o.node_rank) == ("10.0.0.1,10.0.0.2", 30000, None)


def _facts(rank: int, port: int, **kw) -> dict:
    return {"nodes": ["127.0.0.1", "127.0.0.2"], "rank": rank, "address": f"127.0.0.{rank + 1}", "check_port": port,
            "bundle": "b" * 64, "model": "m abc", "plan": "p1 on 1 × H100 (81559 MiB)", "release": f"r{rank}", **kw}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_head_names_a_worker_that_is_missing_or_runs_something_else():
    port = _free_port()
    head = _facts(0, port)
    assert "worker 127.0.0.2 (rank 1) does not answer on 127.0.0.2:" in cluster_node.problem(head, 1, "127.0.0.2")
    s = cluster_node.serve_checks(_facts(1, port))
    try:
        assert cluster_node.problem(head, 1, "127.0.0.2") == ""
        assert cluster_node.ask("127.0.0.2", port)["release"] == "r1"
        other = dict(head, plan="p2 on 2 × H100 (81559 MiB)")
        assert "runs another plan ('p1 on 1 × H100 (81559 MiB)', this server 'p2 on 2 × H100" in \
            cluster_node.problem(other, 1, "127.0.0.2")
        with pytest.raises(BundlerError, match=r"runs another bundle \('bbbbbbbbbbbb', this server 'cccccccccccc'\)") \
                as e:
            cluster.check_workers(cluster.Cluster(("127.0.0.1", "127.0.0.2"), 0, port - 1, "lo"),
                                  dict(head, bundle="c" * 64))
        assert "install on every worker first" in e.value.hint
    finally:
        s.close()


def _fake_worker(port: int, send) -> None:
    import socket
    import threading

    s = socket.create_server(("127.0.0.2", port))

    def serve():
        c, _ = s.accept()
        try:
            send(c)
        except OSError:
            pass
        finally:
            c.close()
            s.close()

    threading.Thread(target=serve, daemon=True).start()


@pytest.mark.parametrize("name, send", [
    ("trickle", lambda c: [c.sendall(b" ") or time.sleep(0.5) for _ in range(40)]),
    ("deep", lambda c: c.sendall(b"[" * 60000)),
    ("odd time", lambda c: c.sendall(json.dumps({**_facts(1, 0), "time": "x"}).encode())),
    ("huge time", lambda c: c.sendall(json.dumps({**_facts(1, 0)}).encode().replace(b'"release"', b'"time": 1'
                                                                                     + b"0" * 400 + b', "release"'))),
    ("not utf-8", lambda c: c.sendall(b"\xff\xfe")),
])
def test_a_worker_answer_that_trickles_or_does_not_read_is_named_not_a_hang_or_a_crash(name, send):
    """Someone on the cluster network, or a local user holding a worker's check port, answers the head: a
    trickle (one byte at a time) is no answer after 3 s, and JSON nested 60,000 deep, a clock that is not a
    number, or bytes that are not text are named, never an exception out of the checks."""
    port = _free_port()
    _fake_worker(port, send)
    head = _facts(0, port)
    t0 = time.monotonic()
    said = cluster_node.problem(head, 1, "127.0.0.2")
    assert time.monotonic() - t0 < 5, name
    assert said == "" if name in ("odd time", "huge time") else said.startswith("worker 127.0.0.2 (rank 1)"), said


def test_the_head_stops_its_engine_when_a_worker_stops_answering(monkeypatch):
    """vLLM's head can hang in a collective when a worker dies: the head's cluster_node stops it, so the
    service restarts as a group, and says which worker."""
    port = _free_port()
    monkeypatch.setattr(cluster_node, "CHECK_EVERY", 0.2)
    worker = cluster_node.serve_checks(_facts(1, port))
    head = _facts(0, port)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop = __import__("threading").Event()
    t = __import__("threading").Thread(target=cluster_node.watch, args=(head, child, stop), daemon=True)
    t.start()
    time.sleep(0.5)
    assert child.poll() is None  # the worker answers: the engine runs on
    worker.close()
    assert child.wait(timeout=10) != 0
    assert "worker 127.0.0.2 (rank 1) does not answer" in head["_stopped_for"]


def test_vllm_on_a_worker_runs_headless_behind_cluster_node_with_its_cluster_address(tmp_path, monkeypatch):
    from bundler import planner
    from bundler.box import release
    from bundler.box.layout import Layout

    monkeypatch.setattr(release, "engine_site", lambda *a: tmp_path / "site")
    monkeypatch.setattr(release, "triton_toolchain", lambda *a, **k: {"cc": "/usr/bin/cc", "headers": "",
                                                                        "flashinfer_jit": ""})
    (tmp_path / "stage" / "bin").mkdir(parents=True)
    plan = planner.Plan(engine="vllm", backend="cuda", model="m", threads=0, slots=8, context_per_slot=4096,
                        gpu_layers=0, total_layers=80, max_model_len=4096, max_num_seqs=256, tensor_parallel=4,
                        pipeline_parallel=2, nodes=2, gpu_memory_utilization=0.9)
    doc = {"engines": [{"name": "vllm", "backend": "cuda", "dir": "engines/vllm", "version": "0.26.0"}], "files": []}
    c = cluster.resolve("10.0.0.1,10.0.0.2", None, None, HAVE)
    script = release._engine_script(tmp_path / "bundle", doc, {"name": "m", "file": "/srv/m", "on_box": True}, plan,
                                    Layout(tmp_path / "p", tmp_path / "etc", "svc"), "r1", tmp_path / "final",
                                    tmp_path / "stage", "10.0.0.1", 8000, False, {}, (c, _facts(1, 29502)))
    flat = script.replace("'", "")
    assert "VLLM_HOST_IP=10.0.0.2" in flat and "VLLM_HOST_IP=10.0.0.1" not in flat
    assert "NCCL_SOCKET_IFNAME=eth1" in flat and "GLOO_SOCKET_IFNAME=eth1" in flat
    assert "-m bundler.cluster_node " + str(tmp_path / "final" / "cluster.json") + " -- " in flat
    assert ("--pipeline-parallel-size 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29501 "
            "--headless") in flat
    assert (tmp_path / "stage" / "cluster.json").is_file()


def test_only_an_engine_that_spreads_over_servers_is_planned_over_them():
    from bundler.box import planning

    m = {"name": "g", "facts": {"format": "gguf", "architecture": "llama", "file_size": 1, "layers": 2, "heads": 1,
                                "kv_heads": 1, "head_dim_k": 1, "head_dim_v": 1, "context_length": 4096}}
    o = options.parse(["--bundle", "/b", "--nodes", "10.0.0.1,10.0.0.2"])
    with pytest.raises(BundlerError, match="serves one server only; across servers: vLLM"):
        planning.make_cluster_plan({"engines": [], "service": {"concurrency": 4, "context": 4096}}, m, None, o, 2)


def test_a_cluster_port_held_by_another_program_is_refused_naming_the_option():
    import socket

    port = _free_port()
    with socket.create_server(("127.0.0.1", port)):
        with pytest.raises(BundlerError, match=f"port {port} on 127.0.0.1 is taken by another program") as e:
            cluster.check_ports_free(cluster.Cluster(("127.0.0.1", "127.0.0.2"), 0, port - 1, "lo"))
    assert f"--cluster-port {port + 1}" in e.value.hint  # the next pair: this port and the one after are both used


def test_the_hosts_lines_torch_needs_to_name_its_peers_without_dns_are_named(tmp_path):
    """Found with real vLLM across two audited servers (tests/e2e/test_cluster.py): torch's rendezvous asks
    DNS for the reverse name of each peer as the IPv4-mapped ::ffff:A, which an `A name` entry in /etc/hosts
    does not answer. The installer reads the file (asking would be the lookup) and names the lines to add."""
    c = cluster.Cluster(("10.0.0.1", "10.0.0.2"), 1, 29501, "eth1")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.1 gpu-a gpu-a.lan  # the head\n::1 localhost ip6-localhost\n")
    note = cluster.hosts_note(c, str(hosts))
    assert "::ffff:10.0.0.1 gpu-a; ::ffff:10.0.0.2 airgap-node-1" in note and str(hosts) in note
    hosts.write_text(hosts.read_text() + "::ffff:10.0.0.1 gpu-a\n::ffff:10.0.0.2 gpu-b # added\nnot-an-address x\n")
    assert cluster.hosts_note(c, str(hosts)) == ""
    assert "::ffff:10.0.0.1 airgap-node-0" in cluster.hosts_note(c, str(tmp_path / "none"))  # no file: all named


def test_an_odd_hosts_file_neither_hangs_the_install_nor_leaks_into_the_note(tmp_path):
    """Found by review: a FIFO at the path hung the installer; a name with terminal escapes was printed and
    suggested as it was; a line glibc cannot use (a vertical tab between its fields) counted as present."""
    import os

    c = cluster.Cluster(("10.0.0.1", "10.0.0.2"), 0, 29501, "eth1")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert "::ffff:10.0.0.1 airgap-node-0" in cluster.hosts_note(c, str(fifo))
    assert time.monotonic() - t0 < 2
    hosts = tmp_path / "hosts"
    hosts.write_bytes(b"10.0.0.1 \x1b]0;pwned\x07\x1b[2Jgpu-a\n::ffff:10.0.0.2\x0bgpu-b\n")
    note = cluster.hosts_note(c, str(hosts))
    assert "\x1b" not in note and "::ffff:10.0.0.1 airgap-node-0" in note
    assert "::ffff:10.0.0.2 airgap-node-1" in note  # the \x0b line is no entry to glibc, so none here
