"""The egress audit: every attempt to reach beyond loopback is recorded and named, from any
process; `install.sh --audit-egress` runs install, start, smoke and bench under it."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bundler import egress
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
LOAD = ["--bench-levels", "1,2", "--bench-max-tokens", "8", "--concurrency", "2"]


def test_a_connect_and_a_dns_lookup_from_any_process_are_recorded_and_named(tmp_path):
    probe = ("import socket\n"
             "try: socket.create_connection(('203.0.113.7', 443), timeout=1)\n"
             "except OSError: pass\n"
             "try: socket.getaddrinfo('weights.example.invalid', 443)\n"
             "except OSError: pass\n"
             "socket.create_connection(('127.0.0.1', 9), timeout=1) if False else None\n")
    with egress.AuditedNamespace(tmp_path / "log.jsonl") as ns:
        subprocess.run(ns.argv([sys.executable, "-c", probe]), timeout=60)
        # loopback stays out of the record: a server and its client inside the namespace
        subprocess.run(ns.argv([sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
                                "s.listen(); socket.create_connection(s.getsockname()).close()"]), timeout=60,
                       check=True)
    seen = ns.attempts()
    whats = {a["what"] for a in seen}
    assert "connect to 203.0.113.7:443" in whats
    assert "DNS lookup of 'weights.example.invalid'" in whats
    assert all("127.0.0.1" not in w for w in whats)
    assert "203.0.113.7:443" in egress.summary(seen)


def test_without_iproute2_the_same_attempts_are_recorded_from_a_private_namespace(tmp_path):
    """unshare(2) and ioctls instead of `ip netns` (boxes without iproute2, like the GPU box): run in
    a child, since the process that enters the namespaces stays in them."""
    probe = ("import socket\n"
             "try: socket.create_connection(('203.0.113.7', 443), timeout=1)\n"
             "except OSError: pass\n"
             "try: socket.getaddrinfo('weights.example.invalid', 443)\n"
             "except OSError: pass\n"
             "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
             "socket.create_connection(s.getsockname()).close()\n")
    code = ("import json, subprocess, sys; from pathlib import Path; from bundler import egress\n"
            f"with egress.PrivateNetwork(Path({str(tmp_path / 'log.jsonl')!r})) as ns:\n"
            f"    subprocess.run([sys.executable, '-c', {probe!r}], timeout=60, check=True)\n"
            "print(json.dumps(ns.attempts()))\n")
    before = set(Path(tempfile.gettempdir()).glob("airgap-audit-*"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    whats = {a["what"] for a in json.loads(r.stdout)}
    assert whats == {"connect to 203.0.113.7:443", "DNS lookup of 'weights.example.invalid'"}  # loopback is not
    assert set(Path(tempfile.gettempdir()).glob("airgap-audit-*")) == before  # its resolver's folder went too
    assert egress.RESOLVER not in Path("/etc/resolv.conf").read_text()  # the private resolver was seen only inside


@pytest.mark.parametrize("how", ["ip", "unshare"])
def test_audit_egress_installs_serves_benches_and_finds_nothing(bundle_dir, tmp_path, how):
    prefix = tmp_path / "p"
    r = subprocess.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18130", "--json",
                        "--audit-egress", *LOAD], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, AIRGAP_LLM_AUDIT=how))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["egress"]["attempts"] == 0 and out["egress"]["steps"] == ["install", "start", "smoke", "bench"]
    assert "Thursday" in out["answer"] and [lv["concurrency"] for lv in out["bench"]["levels"]] == [1, 2]
    assert "egress audit: no attempt to reach beyond loopback" in r.stderr
    # the service ran inside the audit namespace and was stopped with it
    assert subprocess.run([out["ctl"], "status"], capture_output=True).returncode != 0
    assert "install again without --audit-egress" in r.stderr


@pytest.mark.parametrize("how", ["ip", "unshare"])
def test_an_install_that_reaches_out_fails_the_audit_naming_the_address(bundle_dir, tmp_path, how):
    """A --host given by name: looking it up is a DNS query, which on an air-gapped box hangs or
    fails; the audit catches it and names it (the install refuses the host too)."""
    r = subprocess.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--port", "18131", "--json",
                        "--host", "llm.example.invalid", "--audit-egress", *LOAD],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, AIRGAP_LLM_AUDIT=how))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "DNS lookup of 'llm.example.invalid'" in r.stderr
    assert "attempt(s) to reach beyond loopback" in r.stderr
    assert "--host llm.example.invalid: not an address this box can resolve" in r.stderr


def test_a_host_the_box_does_not_have_is_named_as_such(bundle_dir, netns, tmp_path):
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--host", "203.0.113.5"])
    assert r.returncode == 1 and "--host 203.0.113.5: this box has no such address" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "p").exists()
