"""Signatures: only bundles signed by a pinned key install; refusals change nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundler import manifest

pytestmark = pytest.mark.e2e


def copy(bundle_dir, dest):
    shutil.copytree(bundle_dir, dest, copy_function=lambda s, d: shutil.copy2(s, d) if s.endswith(
        ("manifest.json", "SHA256SUMS", ".minisig", ".pub")) else os.link(s, d))
    return dest


def dry(netns, bundle, prefix, *extra, trust=True):
    env = dict(os.environ)
    if not trust:
        env.pop("AIRGAP_LLM_TRUST", None)
    return netns.run([str(bundle / "install.sh"), "--prefix", str(prefix), "--dry-run", *extra], env=env,
                     stdin=subprocess.DEVNULL)


def fingerprint(bundle):
    return json.loads((bundle / "manifest.json").read_text())["signed_by"]


def test_minisign_itself_accepts_the_signature(bundle_dir):
    if not shutil.which("minisign"):
        pytest.skip("minisign is not installed")
    r = subprocess.run(["minisign", "-Vm", str(bundle_dir / "manifest.json"), "-p", os.environ["AIRGAP_LLM_TRUST"]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_pinned_key_is_refused_unless_trusted(bundle_dir, netns, tmp_path):
    r = dry(netns, bundle_dir, tmp_path / "p", trust=False)
    assert r.returncode == 1
    assert f"signed by {fingerprint(bundle_dir)}" in r.stderr and "--trust" in r.stderr
    assert not (tmp_path / "p").exists()
    ok = dry(netns, bundle_dir, tmp_path / "p")
    assert ok.returncode == 0, ok.stderr


def test_a_wrong_key_is_refused(bundle_dir, netns, tmp_path):
    other = tmp_path / "other"
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "keygen"], capture_output=True, text=True,
                       env=dict(os.environ, XDG_CONFIG_HOME=str(other)))
    assert r.returncode == 0, r.stderr
    bad = dry(netns, bundle_dir, tmp_path / "p", "--trust", str(other / "airgap-llm" / "signing-key.pub"),
              trust=False)
    assert bad.returncode == 1
    assert "which this box does not trust" in bad.stderr and not (tmp_path / "p").exists()


def test_valid_sums_but_a_changed_manifest_fail_the_signature(bundle_dir, netns, tmp_path):
    b = copy(bundle_dir, tmp_path / "b")
    m = b / "manifest.json"
    m.write_text(m.read_text().replace('"version": "1.0.0"', '"version": "9.9.9"'))
    sums = (b / "SHA256SUMS").read_text().splitlines()
    sums[-1] = f"{manifest.sha256_file(m)}  manifest.json"
    (b / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=b).returncode == 0
    r = dry(netns, b, tmp_path / "p")
    assert r.returncode == 1 and "does not verify manifest.json with key" in r.stderr
    assert not (tmp_path / "p").exists()


def test_a_missing_signature_needs_allow_unsigned_which_is_shouted(bundle_dir, netns, tmp_path):
    b = copy(bundle_dir, tmp_path / "b")
    (b / "manifest.json.minisig").unlink()
    r = dry(netns, b, tmp_path / "p")
    assert r.returncode == 1 and "is not signed" in r.stderr and not (tmp_path / "p").exists()
    r = dry(netns, b, tmp_path / "p", "--allow-unsigned")
    assert r.returncode == 0, r.stderr
    assert "INSTALLING AN UNSIGNED BUNDLE" in r.stderr


def test_an_older_signed_bundle_is_refused_after_a_newer_one(bundle_dir, netns, tmp_path):
    prefix = tmp_path / "p"
    (prefix / "etc").mkdir(parents=True)
    name = json.loads((bundle_dir / "manifest.json").read_text())["name"]
    newer = {name: {"version": "2.0.0", "key": "", "unsigned": False}}
    (prefix / "etc" / "accepted.json").write_text(json.dumps(newer))
    r = dry(netns, bundle_dir, prefix)
    assert r.returncode == 1 and "older than 2.0.0" in r.stderr and "--allow-downgrade" in r.stderr
    r = dry(netns, bundle_dir, prefix, "--allow-downgrade")
    assert r.returncode == 0, r.stderr


def test_yes_alone_pins_nothing_and_a_fingerprint_pins_only_its_key(bundle_dir, netns, tmp_path):
    """--yes pinned whatever key the bundle carried: whoever made the bundle chose the key."""
    prefix = tmp_path / "p"
    r = dry(netns, bundle_dir, prefix, "--yes", trust=False)
    assert r.returncode == 1 and "--yes alone pins nothing" in r.stderr and "--trust-fingerprint" in r.stderr
    assert not prefix.exists()
    r = dry(netns, bundle_dir, prefix, "--trust-fingerprint", "0000000000000000", trust=False)
    assert r.returncode == 1 and "not 0000000000000000" in r.stderr and not prefix.exists()
    r = dry(netns, bundle_dir, prefix, "--trust-fingerprint", fingerprint(bundle_dir).lower(), trust=False)
    assert r.returncode == 0, r.stderr


def test_bundler_verify_with_trust_checks_the_signature_too(bundle_dir, tmp_path):
    """A flipped byte in manifest.json.minisig passed `bundler verify`, which checked no signature."""
    import random

    from bundler.cli import _signature_problems

    b = copy(bundle_dir, tmp_path / "b")
    key = os.environ["AIRGAP_LLM_TRUST"]

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "bundler.cli", "verify", str(b), *extra], capture_output=True,
                              text=True)

    ok = cli("--trust", key)
    assert ok.returncode == 0 and "signed by a key given with --trust" in ok.stdout, ok.stderr
    sig = b / "manifest.json.minisig"
    good = sig.read_bytes()
    rng = random.Random(11)
    for trial in range(40):  # every byte of the signature file counts, the comments too
        flipped = bytearray(good)
        i = rng.randrange(len(flipped))
        flipped[i] ^= 1 << rng.randrange(8)
        sig.write_bytes(bytes(flipped))
        data = (b / "manifest.json").read_bytes()
        assert any("manifest.json.minisig" in p for p in _signature_problems(b, data, [Path(key)])), (trial, i)
    r = cli("--trust", key)
    assert r.returncode == 1 and "manifest.json.minisig" in r.stderr
    sig.write_bytes(good)
    assert cli("--trust", key).returncode == 0


def test_no_code_from_a_changed_bundle_runs_before_the_signature_holds(bundle_dir, netns, tmp_path):
    """install.sh ran the installer from the bundle's own wheels before anything was checked: whoever
    could change the bundle could change the check. Now bootstrap.py (standard library only) checks the
    signature and the installer's wheels first; a planted wheel never runs, even with a manifest
    rewritten to match it."""
    import zipfile

    b = copy(bundle_dir, tmp_path / "b")
    wheel = next((b / "wheels").glob("airgap_llm-*.whl"))
    marker = tmp_path / "pwned"
    planted = tmp_path / "planted.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(planted, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            if item.filename == "bundler/__init__.py":
                body += f"\nopen({str(marker)!r}, 'w').write('ran')\n".encode()
            dst.writestr(item, body)
    wheel.unlink()
    shutil.copy(planted, wheel)
    r = dry(netns, b, tmp_path / "p")
    assert r.returncode == 1 and f"wheels/{wheel.name}: sha256 mismatch" in r.stderr, r.stderr
    assert "none of the bundle's code was run" in r.stderr
    assert not marker.exists() and not (tmp_path / "p").exists()

    # the manifest and SHA256SUMS rewritten to match the planted wheel: the signature no longer holds
    doc = json.loads((b / "manifest.json").read_text())
    for f in doc["files"]:
        if f["path"] == f"wheels/{wheel.name}":
            f["size"], f["sha256"] = wheel.stat().st_size, manifest.sha256_file(wheel)
    (b / "manifest.json").unlink()
    (b / "manifest.json").write_text(json.dumps(doc))
    r = dry(netns, b, tmp_path / "p")
    assert r.returncode == 1 and "does not verify manifest.json with key" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "p").exists()

    # --help and --probe ran the bundle's wheels before any check at all (they change nothing, but
    # the code they run is the bundle's): as root now only when a trusted key signs it
    for flag in ("--help", "--probe"):
        r = subprocess.run([str(b / "install.sh"), flag], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and "does not verify manifest.json with key" in r.stderr, r.stderr
        env = {k: v for k, v in os.environ.items() if k != "AIRGAP_LLM_TRUST"}
        r = subprocess.run([str(b / "install.sh"), flag], capture_output=True, text=True, env=env,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and "as root must be signed by a key this box trusts" in r.stderr, r.stderr
        assert "nothing was run" in r.stderr
    assert not marker.exists()
    # as an ordinary user they run, and say the code is unvouched for (they run install.sh as that user anyway)
    good = copy(bundle_dir, tmp_path / "good")
    r = subprocess.run(["runuser", "-u", "nobody", "--", str(good / "install.sh"), "--help"], capture_output=True,
                       text=True, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "unvouched for" in r.stderr and "--prefix" in r.stdout, r.stderr
