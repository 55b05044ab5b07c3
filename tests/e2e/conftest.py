"""End to end: a real bundle of the default spec, installed inside a network namespace that has
loopback and an audited dead end for everything else, answering through the official openai client."""

from __future__ import annotations

import os
import shutil
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest

from bundler import egress

ROOT = Path(__file__).resolve().parents[2]
GEMMA = ROOT / "tests" / "data" / "gemma3-270m-cpu.toml"  # the base model the end-to-end tests install


@pytest.fixture(scope="session", autouse=True)
def engine_account(tmp_path_factory):
    """Installs run as root here, so the engine drops to an unprivileged account: `nobody` (the
    default, a system user the installer makes, is exercised in the Debian roots, not on this
    machine). It must reach the prefixes under the test's temporary folder: search, not list."""
    os.environ["AIRGAP_LLM_USER"] = "nobody"
    base = tmp_path_factory.getbasetemp()
    for d in (base, *base.parents):
        if d == Path("/tmp") or d == d.parent:
            break
        d.chmod(d.stat().st_mode | 0o011)


@pytest.fixture(autouse=True)
def searchable_tmp(tmp_path):
    """Each test's folder and those above it (0700 from pytest, which resets them whenever another
    pytest starts) searchable, so `nobody` reaches a prefix inside it."""
    for d in (tmp_path, *tmp_path.parents):
        if d == Path("/tmp") or d == d.parent:
            break
        d.chmod(d.stat().st_mode | 0o011)


@pytest.fixture(scope="session")
def signing_home(tmp_path_factory) -> Path:
    """A signing key made for this test run (bundler keygen on first bundle), and the box's
    trust of it given the way an operator would: AIRGAP_LLM_TRUST=KEY.pub."""
    home = tmp_path_factory.mktemp("config")
    os.environ["XDG_CONFIG_HOME"] = str(home)
    os.environ["AIRGAP_LLM_TRUST"] = str(home / "airgap-llm" / "signing-key.pub")
    return home


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, signing_home) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(GEMMA), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "next:" in r.stdout and "install.sh" in r.stdout
    return out / "gemma3-270m-cpu"


@pytest.fixture(scope="session")
def parts_bundle_dir(tmp_path_factory, signing_home) -> Path:
    """The default bundle split for a transfer gateway that takes files of at most 60 MiB."""
    out = tmp_path_factory.mktemp("dist-parts")
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(GEMMA), "--out", str(out),
                        "--part-size", "60M"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no file in" in r.stdout
    return out / "gemma3-270m-cpu"


@pytest.fixture(scope="session")
def second_bundle_dir(tmp_path_factory, signing_home) -> Path:
    """The default bundle under another name: a second service for the same prefix."""
    d = tmp_path_factory.mktemp("second")
    spec = d / "second.toml"
    spec.write_text((GEMMA).read_text().replace('name = "gemma3-270m-cpu"', 'name = "second-cpu"'))
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(spec), "--out", str(d / "dist")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return d / "dist" / "second-cpu"


TWO_MODELS = ("chat", 18130), ("embed", 18131)


@pytest.fixture(scope="session")
def two_model_bundle_dir(tmp_path_factory, signing_home, bundle_dir) -> Path:
    """A chat model and an embedding model in one bundle: the default GGUF twice, the second with
    task = "embed" (mean-pooled: no embedding-only GGUF ships on the package index)."""
    from bundler.manifest import sha256_file

    gguf = bundle_dir / "models/gemma-3-270m-q4_k_m.gguf"
    d = tmp_path_factory.mktemp("two")
    spec = d / "two.toml"
    (chat, port), (embed, _) = TWO_MODELS
    spec.write_text("\n".join([
        '[bundle]', 'name = "chat-and-embed"',
        '[[models]]', f'name = "{chat}"', f'source = "{gguf}"', f'sha256 = "{sha256_file(gguf)}"',
        '[[models]]', f'name = "{embed}"', 'task = "embed"', f'source = "{gguf}"', f'sha256 = "{sha256_file(gguf)}"',
        '[service]', f'port = {port}', 'concurrency = 2', 'context = 1024']) + "\n")
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(spec), "--out", str(d / "dist")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return d / "dist" / "chat-and-embed"


class Netns:
    """A network namespace with loopback up and one audited way out (bundler.egress): a dead end
    that records every connect and DNS lookup beyond loopback. Commands run inside it; a test whose
    commands tried to reach out fails, naming each address (the egress audit, always on in tests)."""

    def __init__(self) -> None:
        self.ns: egress.AuditedNamespace | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="airgap-netns-"))

    @property
    def name(self) -> str:
        assert self.ns is not None
        return self.ns.name

    def __enter__(self) -> Netns:
        if os.geteuid() != 0 or not shutil.which("ip"):
            pytest.fail("the offline e2e test needs root and iproute2 (ip netns) to make a namespace without network")
        self.ns = egress.AuditedNamespace(self.tmp / "egress.jsonl").__enter__()
        return self

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 600)
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def attempts(self) -> list[dict]:
        assert self.ns is not None
        return self.ns.attempts()

    def __exit__(self, *exc) -> None:
        # nothing may outlive the namespace: AuditedNamespace kills what still runs in it
        assert self.ns is not None
        self.ns.__exit__(*exc)
        seen = self.ns.attempts()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if seen and exc[0] is None and not getattr(self, "expect_egress", False):
            pytest.fail(egress.summary(seen))


@pytest.fixture
def netns():
    with Netns() as ns:
        yield ns
