"""One server of a service spread over several (install.sh --nodes): what its launch script runs in
front of the engine. Standard library only; it runs from the release, as the engine's account.

    python -m bundler.cluster_node FACTS.json -- ENGINE ARGV...

Every server answers on its cluster address, port FACTS["check_port"], with one line of JSON: the
bundle (its manifest's sha256), the model, the plan, its rank and its clock. It reads nothing from
whoever connects, so the port can tell what runs there and nothing else; like vLLM's own traffic it
belongs on the servers' private network.

The head (rank 0) asks every worker before it starts the engine: one that does not answer, or runs
another bundle, model or plan, is named in the log, and the head waits for it (up to
FACTS["wait_s"]) rather than starting an engine that would hang until the workers' timeouts. While
the engine serves, the head asks again every few seconds: a worker that stops answering is named and
the head's engine stopped, so that the service restarts as a group (systemd's Restart=, the
supervisor's) once it is back, instead of hanging in a collective that never completes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

ANSWER_MAX = 64 * 1024
CHECK_EVERY = 5.0  # seconds between the head's checks of its workers while it serves
MISSES = 3  # checks in a row a worker may miss before the head stops (a restart takes a moment)
SAME = ("bundle", "model", "plan", "nodes")  # what every server of one service must agree on
CLOCK_SKEW = 30.0  # seconds: further apart, the logs of the servers cannot be read together; warned


def say(msg: str) -> None:
    print(f"airgap-llm cluster: {msg}", file=sys.stderr, flush=True)


def answer(facts: dict[str, Any]) -> bytes:
    return (json.dumps({**{k: facts[k] for k in (*SAME, "rank", "release")}, "time": time.time()}) + "\n").encode()


def serve_checks(facts: dict[str, Any]) -> socket.socket:
    """Listen on the cluster address's check port; each connection gets the answer and is closed."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # --nodes takes IPv4 addresses only
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((facts["address"], facts["check_port"]))
    s.listen(16)

    def loop() -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            try:
                c.settimeout(2.0)
                c.sendall(answer(facts))
            except OSError:
                pass
            finally:
                c.close()

    threading.Thread(target=loop, daemon=True).start()
    return s


def ask(address: str, port: int, timeout: float = 3.0) -> dict[str, Any]:
    """One server's answer on its check port, whole within `timeout` seconds; OSError or ValueError if there
    is none, or not one (a peer that trickles bytes or nests JSON deep is no answer, not a hang or a crash)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((address, port), timeout=timeout) as c:
        data = b""
        while len(data) <= ANSWER_MAX:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole answer within {timeout:g}s")
            c.settimeout(left)
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    if len(data) > ANSWER_MAX:
        raise ValueError(f"an answer over {ANSWER_MAX} bytes")
    try:
        doc = json.loads(data.decode())
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def problem(facts: dict[str, Any], rank: int, address: str) -> str:
    """What is wrong with worker `rank` at `address`, or '' when it answers as one of this service."""
    try:
        return _problem(facts, rank, address)
    except Exception as e:  # noqa: BLE001 - whatever a peer sends, the checks go on and say so
        return f"worker {address} (rank {rank}) gave an answer that does not read ({type(e).__name__})"


def _problem(facts: dict[str, Any], rank: int, address: str) -> str:
    where = f"worker {address} (rank {rank})"
    try:
        got = ask(address, facts["check_port"])
    except (OSError, ValueError) as e:
        return (f"{where} does not answer on {address}:{facts['check_port']} ({e}): install or start the "
                "service there (its bin/ctl start)")
    for k in SAME:
        if got.get(k) != facts[k]:
            n = 12 if k == "bundle" else 200  # what a peer says is shown, never more than this of it
            theirs, ours = str(got.get(k))[:n], str(facts[k])[:n]
            return (f"{where} runs another {k} ({theirs!r}, this server {ours!r}): install the same "
                    "bundle with the same options on every server")
    if got.get("rank") != rank:
        return f"{where} says it is rank {str(got.get('rank'))[:40]!r}: give every server the same --nodes list"
    try:
        skew = abs(float(got.get("time")) - time.time())
    except (TypeError, ValueError, OverflowError):
        skew = math.inf
    if not skew <= CLOCK_SKEW:
        say(f"{where}'s clock is {skew:.0f}s off this server's (or unreadable): its logs will not line up with "
            "these")
    return ""


def workers(facts: dict[str, Any]) -> list[tuple[int, str]]:
    return [(r, a) for r, a in enumerate(facts["nodes"]) if r != facts["rank"]] if facts["rank"] == 0 else []


def wait_for_workers(facts: dict[str, Any], wait_s: float) -> str:
    """'' once every worker answers as one of this service, else the last problem after wait_s."""
    t0, said = time.monotonic(), ""
    while True:
        probs = [p for r, a in workers(facts) if (p := problem(facts, r, a))]
        if not probs:
            return ""
        if probs[0] != said:
            say(probs[0] + ("" if time.monotonic() - t0 < wait_s else "; giving up"))
            said = probs[0]
        if time.monotonic() - t0 >= wait_s:
            return probs[0]
        time.sleep(2.0)


def watch(facts: dict[str, Any], child: subprocess.Popen, stop: threading.Event) -> None:
    """While the engine runs: a worker that misses MISSES checks in a row stops the head's engine."""
    missed: dict[int, int] = {}
    while not stop.wait(CHECK_EVERY):
        for r, a in workers(facts):
            p = problem(facts, r, a)
            missed[r] = missed.get(r, 0) + 1 if p else 0
            if missed[r] >= MISSES:
                say(f"{p}; stopping this server's engine so the service restarts as a group once it is back")
                facts["_stopped_for"] = p
                child.terminate()
                return


BIND_WAIT = 120.0  # seconds: after a reboot the cluster interface may come up after the service starts


def listen(facts: dict[str, Any]) -> socket.socket:
    """serve_checks, retried while the cluster address is not there yet (or the port still held)."""
    t0 = time.monotonic()
    while True:
        try:
            return serve_checks(facts)
        except OSError as e:
            if time.monotonic() - t0 >= BIND_WAIT:
                raise
            if time.monotonic() - t0 < 1:
                say(f"cannot listen on {facts['address']}:{facts['check_port']} yet ({e.strerror}); trying again for "
                    f"{BIND_WAIT:.0f}s")
            time.sleep(2.0)


def run(facts: dict[str, Any], argv: list[str]) -> int:
    checks = listen(facts)
    say(f"rank {facts['rank']} of {len(facts['nodes'])} ({facts['address']}), release {facts['release']}; "
        f"answering checks on {facts['address']}:{facts['check_port']}")
    if facts["rank"] == 0:
        p = wait_for_workers(facts, float(facts.get("wait_s", 600)))
        if p:
            return 75  # EX_TEMPFAIL: restarted later by systemd or the supervisor
        say("every worker answers as one of this service; starting the engine")
    child = subprocess.Popen(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    stop = threading.Event()
    if facts["rank"] == 0:
        threading.Thread(target=watch, args=(facts, child, stop), daemon=True).start()
    try:
        rc = child.wait()
    finally:
        stop.set()
        checks.close()
    if facts.get("_stopped_for"):
        return 75
    return rc


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f:
        facts = json.load(f)
    try:
        return run(facts, args[2:])
    except OSError as e:
        say(f"cannot answer checks on {facts.get('address')}:{facts.get('check_port')}: {e}")
        return 75
    except Exception as e:  # noqa: BLE001 - one line in the log and a restart, not a traceback
        say(f"stopped: {type(e).__name__}: {e}")
        return 75


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
