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
B = "gemma3-270m-cpu"  # the default bundle's name: its folder in a prefix


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
    assert fingerprint(bundle_dir).startswith("SHA256:")
    r = dry(netns, bundle_dir, prefix, "--trust-fingerprint", fingerprint(bundle_dir), trust=False)
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


# ---- round 2: the classes, not the instances ------------------------------------------------

def _forged(bundle, dest):
    """The bundle re-signed by a new key that carries the real key's minisign ID, with a planted
    installer: what round 1's review did."""
    import hashlib
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bundler.contract import trust as policy

    b = copy(bundle, dest)
    real = policy.parse_public_key((b / "signer.pub").read_text())
    priv = Ed25519PrivateKey.generate()
    forged = policy.PublicKey(real.key_id, priv.public_key().public_bytes_raw())
    data = (b / "manifest.json").read_bytes()
    sig = priv.sign(hashlib.blake2b(data, digest_size=64).digest())
    trusted = f"timestamp:{int(time.time())}\tfile:manifest.json\thashed"
    (b / "manifest.json.minisig").unlink()
    (b / "manifest.json.minisig").write_bytes(
        policy.signature_text(b"ED" + forged.key_id + sig, trusted, priv.sign(sig + trusted.encode())))
    (b / "signer.pub").unlink()
    (b / "signer.pub").write_text(forged.to_text())
    return b, real, forged


def test_a_key_is_known_by_its_bytes_not_its_copyable_id(bundle_dir, netns, tmp_path):
    """Round 1: a new key given the real key's 8-byte ID was accepted with --trust-fingerprint <the
    real ID>, pinned, and then refused the genuine bundle. Now the fingerprint is the key's SHA-256."""
    b, real, forged = _forged(bundle_dir, tmp_path / "b")
    prefix = tmp_path / "p"
    r = dry(netns, b, prefix, "--trust-fingerprint", real.label, trust=False)
    assert r.returncode == 1 and forged.fingerprint in r.stderr and "none of the bundle's code was run" in r.stderr
    r = dry(netns, b, prefix, "--trust-fingerprint", real.fingerprint, trust=False)
    assert r.returncode == 1 and forged.fingerprint in r.stderr and real.fingerprint in r.stderr
    # the real key given (or pinned): a key with its ID and other bytes is refused, both named
    r = dry(netns, b, prefix, "--trust-fingerprint", forged.fingerprint)
    assert r.returncode == 1 and "label anyone can copy" in r.stderr
    assert real.fingerprint in r.stderr and forged.fingerprint in r.stderr
    assert not prefix.exists()  # nothing pinned, nothing made
    r = dry(netns, bundle_dir, prefix)  # and the genuine bundle is still welcome
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("version", ["3.9", "3.10"])
def test_nothing_from_the_current_folder_or_the_environment_runs_before_the_signature(bundle_dir, netns, tmp_path,
                                                                                       version):
    """Round 1: bootstrap re-executed Python in the operator's folder (the bundle's, in the README's
    flow), and on 3.9/3.10 a runpy.py placed there ran as root before any file was verified. The whole
    class: the current folder, PYTHON* variables, site and user customisation."""
    exe = next(iter(sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))), None)
    if exe is None:
        pytest.skip(f"no python{version} here")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    (evil / "bundler").mkdir(parents=True)
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for name in ("runpy.py", "sitecustomize.py", "usercustomize.py", "json.py", "fnmatch.py", "tempfile.py",
                 "startup.py", "bundler/__init__.py", "bundler/box.py"):
        (evil / name).write_text(payload)
    env = dict(os.environ, AIRGAP_LLM_PYTHON=str(exe), PYTHONPATH=str(evil), PYTHONSTARTUP=str(evil / "startup.py"),
               PYTHONUSERBASE=str(evil), PYTHONINSPECT="", PYTHONHOME="")
    env.pop("PYTHONHOME")
    env.pop("PYTHONINSPECT")
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"], env=env,
                  cwd=evil, stdin=subprocess.DEVNULL)
    assert not marker.exists(), marker.read_text()
    assert r.returncode == 0, r.stderr
    # the README's flow: the operator's current folder is the bundle's; a module planted there
    b = copy(bundle_dir, tmp_path / "b")
    (b / "runpy.py").write_text(payload)
    r = netns.run([str(b / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"], env=env, cwd=b,
                  stdin=subprocess.DEVNULL)
    assert not marker.exists(), marker.read_text()
    assert r.returncode == 1 and "runpy.py" in r.stderr  # the extra file is named by the verification


def test_a_bundle_folder_someone_else_can_write_is_refused_before_any_code_runs(bundle_dir, netns, tmp_path):
    """Round 1: the owner of the bundle folder (the README had the operator unpack as themselves, then
    sudo) swapped an installer wheel between its check and its use, and --uninstall followed a swapped
    manifest out of the prefix. Whoever else can write the folder could do either: refused, and how to
    fix it said."""
    nobody = 65534
    for target in ("", "wheels", "manifest.json", "install.sh"):
        b = copy(bundle_dir, tmp_path / f"b-{target or 'top'}")
        path = b / target if target else b
        if path.is_file():  # a real copy, not a hard link to the session's bundle
            data = path.read_bytes()
            path.unlink()
            path.write_bytes(data)
            path.chmod(0o755 if target == "install.sh" else 0o644)
        os.chown(path, nobody, nobody)
        for action in (["--dry-run"], ["--uninstall"]):
            r = netns.run([str(b / "install.sh"), "--prefix", str(tmp_path / "p"), *action],
                          stdin=subprocess.DEVNULL)
            assert r.returncode == 1, (target, r.stderr)
            assert "can be changed by someone other than root" in r.stderr and "belongs to user nobody" in r.stderr
            assert "chown -R root:root" in r.stderr and "none of the bundle's code was run" in r.stderr
    assert not (tmp_path / "p").exists()
    above = tmp_path / "home"  # a folder above the bundle that another user owns could swap the bundle whole
    above.mkdir()
    b = copy(bundle_dir, above / "b")
    os.chown(above, nobody, nobody)
    r = netns.run([str(b / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"], stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and f"{above} belongs to user nobody" in r.stderr


def test_bundler_verify_checks_sha256sums_and_a_tars_signature(bundle_dir, tmp_path):
    """A flipped byte in SHA256SUMS passed `bundler verify DIR` while `sha256sum -c` failed, and
    `bundler verify TAR --trust KEY` ignored the key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bundler.contract import trust as policy

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "bundler.cli", "verify", *map(str, args)], capture_output=True,
                              text=True)

    b = copy(bundle_dir, tmp_path / "b")
    sums = b / "SHA256SUMS"
    text = sums.read_bytes()
    sums.unlink()
    sums.write_bytes(text[:10] + (b"0" if text[10:11] != b"0" else b"1") + text[11:])
    r = cli(b)
    assert r.returncode == 1 and "SHA256SUMS" in r.stderr
    tar = bundle_dir.parent / f"{bundle_dir.name}.tar"
    key = os.environ["AIRGAP_LLM_TRUST"]
    other = tmp_path / "other.pub"
    other.write_text(policy.PublicKey(os.urandom(8), Ed25519PrivateKey.generate().public_key()
                                      .public_bytes_raw()).to_text())
    r = cli(tar, "--trust", other)
    assert r.returncode == 1 and "does not verify manifest.json" in r.stderr
    r = cli(tar, "--trust", key)
    assert r.returncode == 0 and "signed by a key given with --trust" in r.stdout, r.stderr


FAKE = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def _any(self):
        with open(sys.argv[2], 'a') as f:
            f.write(self.path + ' ' + str(self.headers.get('Authorization')) + '\\n')
        self.send_response(200); self.send_header('Content-Type', 'application/json'); self.end_headers()
        self.wfile.write(b'{}')
    do_GET = do_POST = _any
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


def test_the_key_goes_only_to_the_services_own_listener(bundle_dir, netns, tmp_path):
    """Round 1: a local user who bound the service port first got the real key in the smoke test, and
    during a `ctl restart` every client's while `ctl status` said "running"; the printed curl put the
    key on a command line. Also: under umask 000 the release was world-writable."""
    import time

    from bundler.box.layout import Layout

    prefix, port = tmp_path / "p", 18140
    r = netns.run(["sh", "-c", 'umask 000; exec "$0" "$@"', str(bundle_dir / "install.sh"), "--prefix", str(prefix),
                   "--port", str(port), "--json"], stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    key = next(ln.split("=", 1)[1] for ln in Path(out["api_key_file"]).read_text().splitlines()
               if ln.startswith("LLAMA_API_KEY="))
    release = Path(out["release"])
    loose = [str(p) for p in release.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o022]
    assert loose == [], loose[:5]
    # the printed command works as pasted, and reads the key at run time (never in its own text or argv)
    assert key not in out["curl"] and "max_tokens" in out["curl"]
    c = netns.run(["sh", "-c", out["curl"]])
    assert c.returncode == 0 and json.loads(c.stdout)["choices"], c.stdout + c.stderr

    # run again without --port: the installed release's options are the defaults, and that is said
    again = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--json"], stdin=subprocess.DEVNULL)
    assert again.returncode == 0 and "as installed" in again.stderr and f"--port {port}" in again.stderr, again.stderr
    assert json.loads(again.stdout)["endpoint"] == out["endpoint"] and json.loads(again.stdout)["changed"] is False
    # every service in the prefix, with its state (install.sh --list)
    rows = json.loads(netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--list", "--json"],
                                stdin=subprocess.DEVNULL).stdout)
    assert [(r["name"], r["state"], r["endpoint"]) for r in rows] == [(B, "running", out["endpoint"])]
    ctl = prefix / B / "current" / "bin" / "ctl"
    assert netns.run([str(ctl), "stop"]).returncode == 0
    table = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--list"], stdin=subprocess.DEVNULL)
    assert table.returncode == 0 and B in table.stdout and "stopped" in table.stdout, table.stderr
    seen = tmp_path / "seen.txt"
    seen.write_text("")
    seen.chmod(0o666)
    fake = netns.popen(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", FAKE, str(port), str(seen)])
    assert fake.poll() is None
    try:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
        for _ in range(100):
            if netns.run([sys.executable, "-c", probe]).returncode == 0 or fake.poll() is not None:
                break
            time.sleep(0.1)
        # installing again: refused before anything changes, naming who holds the port
        r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", str(port)],
                      stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and f"port {port} on 127.0.0.1 is taken" in r.stderr
        assert f"pid {fake.pid}" in r.stderr or "(user nobody" in r.stderr, r.stderr
        # the service started while another program holds its port: status says so instead of "running"
        assert netns.run([str(ctl), "start"]).returncode == 0
        st = netns.run([str(ctl), "status"])
        assert st.returncode == 4 and "user nobody" in st.stderr and "clients' keys would go to it" in st.stderr
        rows = json.loads(netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--list", "--json"],
                                    stdin=subprocess.DEVNULL).stdout)
        assert rows[0]["state"] == "running, port taken by another program"
        # the check the installer makes before the smoke test sends the key
        check = ("import sys; from pathlib import Path; from bundler.box import listener; "
                 "from bundler.box.layout import Layout; p = Path(sys.argv[1]); "
                 "listener.require_ours(Layout(p, p / 'etc', sys.argv[2]), 'process', [int(sys.argv[3])])")
        done = netns.run([sys.executable, "-c", check, str(prefix), B, str(port)])
        assert done.returncode == 1 and "user nobody" in done.stderr and "the API key was not sent" in done.stderr
        assert Layout(prefix, prefix / "etc", B).pidfile.exists()
    finally:
        fake.kill()
        netns.run([str(ctl), "stop"])
    assert key not in seen.read_text() and "Bearer" not in seen.read_text(), seen.read_text()


def test_as_root_a_python_someone_else_can_replace_is_refused(bundle_dir, netns, tmp_path):
    """Which python3 runs first as root is part of what runs before the signature holds: one in a folder
    others can write (a PATH entry, AIRGAP_LLM_PYTHON) could be swapped for anything."""
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    marker = tmp_path / "ran"
    (loose / "python3").write_text(f"#!/bin/sh\ntouch {marker}\nexec {sys.executable} \"$@\"\n")
    (loose / "python3").chmod(0o755)
    env = dict(os.environ, AIRGAP_LLM_PYTHON=str(loose / "python3"))
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"], env=env,
                  stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and f"{loose} can be changed by a user other than root" in r.stderr, r.stderr
    assert not marker.exists()  # refused before it ran even once (it used to be asked its version first)
    loose.chmod(0o755)  # the same python, from a folder only root can change
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"], env=env,
                  stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    # a venv's pyvenv.cfg names the python home whose standard library runs at start, even with -I -S: one
    # another user owns is refused like the interpreter
    cfg = tmp_path / "pyvenv.cfg"
    cfg.write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    os.chown(cfg, 65534, 65534)
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"], env=env,
                  stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and f"{cfg} can be changed by a user other than root" in r.stderr, r.stderr


def test_keys_pinned_where_others_can_write_are_not_trusted_and_allow_unsigned_covers_no_forgery(bundle_dir, netns,
                                                                                                  tmp_path):
    """A key planted in a config folder another user can write made bootstrap run that key's bundle as
    root (the folder's owner was checked only later, by the bundle's own code); --allow-unsigned also
    waved through a signature by a key that copied the trusted key's ID."""
    b, real, forged = _forged(bundle_dir, tmp_path / "b")
    prefix = tmp_path / "p"
    trusted = prefix / "etc" / "trusted.d"
    trusted.mkdir(parents=True)
    (trusted / "attacker.pub").write_text(forged.to_text())
    os.chown(prefix / "etc", 65534, 65534)
    r = dry(netns, b, prefix, trust=False)
    assert r.returncode == 1 and "what this box trusts can be changed by someone other than root" in r.stderr, r.stderr
    assert "none of the bundle's code was run" in r.stderr
    os.chown(prefix / "etc", 0, 0)
    (trusted / "attacker.pub").unlink()
    r = dry(netns, b, prefix, "--allow-unsigned")  # the real key given: the forged one is no unsigned bundle
    assert r.returncode == 1 and "never one whose signature is wrong" in r.stderr, r.stderr


def test_the_private_folder_goes_away_even_after_a_killed_installer(bundle_dir, netns, tmp_path):
    """bootstrap's checked copies live in a private folder the installer removes when it ends; one that a
    killed installer left (SIGKILL runs no cleanup) is removed by the next start, a live one's is not."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    dead = tmp / "airgap-llm-boot-999999999-abc"  # no such pid
    live = tmp / f"airgap-llm-boot-{os.getpid()}-abc"
    for d in (dead, live):
        d.mkdir(mode=0o700)
        (d / "manifest.json").write_text("{}")
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"],
                  env=dict(os.environ, TMPDIR=str(tmp)), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp.iterdir()) == [live.name]
    # --help and a usage error end before any work: their private folder goes too
    for args, code in ((["--help"], 0), (["--no-such-option"], 2)):
        r = netns.run([str(bundle_dir / "install.sh"), *args], env=dict(os.environ, TMPDIR=str(tmp)),
                      stdin=subprocess.DEVNULL)
        assert r.returncode == code, r.stderr
        assert sorted(p.name for p in tmp.iterdir()) == [live.name], args
