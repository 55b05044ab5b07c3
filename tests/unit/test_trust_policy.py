"""The one trust policy (bundler/contract/trust.py): key identity, the decision, who may write."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundler.contract import embedded
from bundler.contract import trust as policy

ed = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
CONTRACT = Path(policy.__file__).parent


def keypair(key_id=None):
    priv = ed.Ed25519PrivateKey.generate()
    return priv, policy.PublicKey(key_id or os.urandom(8), priv.public_key().public_bytes_raw())


def sign(data, priv, pub):
    """manifest.json.minisig as the bundler writes it, by any key (an attacker's too)."""
    sig = priv.sign(hashlib.blake2b(data, digest_size=64).digest())
    trusted = f"timestamp:{int(time.time())}\tfile:manifest.json\thashed"
    return policy.signature_text(b"ED" + pub.key_id + sig, trusted, priv.sign(sig + trusted.encode()))


DATA = b'{"name": "b", "version": "1.0.0", "files": []}'


def test_a_fingerprint_is_the_hash_of_the_key_not_its_copyable_id():
    _, real = keypair()
    _, forged = keypair(real.key_id)
    assert real.label == forged.label  # minisign's ID: the same, anyone can claim it
    assert real.fingerprint != forged.fingerprint
    assert real.fingerprint.startswith("SHA256:") and len(real.fingerprint) == 7 + 43
    assert policy.parse_public_key(real.to_text()) == real


def test_a_forged_key_with_the_trusted_keys_id_is_refused_naming_both():
    """Round 1's hole: --trust-fingerprint compared the 8-byte ID, so a new key given the real key's ID,
    a re-signed manifest and a patched installer were accepted, and the forged key was pinned."""
    real_priv, real = keypair()
    forged_priv, forged = keypair(real.key_id)
    blob = sign(DATA, forged_priv, forged)
    # the operator names the real key's ID (what the old prompt showed): that is no fingerprint
    d = policy.decide(DATA, blob, [], [], forged, [real.label])
    assert not d.ok and d.pin is None and forged.fingerprint in d.why and real.label in d.why
    # the operator names the real key's fingerprint: the forged key is not it
    d = policy.decide(DATA, blob, [], [], forged, [real.fingerprint])
    assert not d.ok and forged.fingerprint in d.why and real.fingerprint in d.why
    # the real key pinned: a key with its ID but other bytes is refused, both named
    for pinned, given in (([real], []), ([], [real])):
        d = policy.decide(DATA, blob, given, pinned, forged, [forged.fingerprint])
        assert not d.ok and real.fingerprint in d.why and forged.fingerprint in d.why and "label" in d.why
    # and the genuine bundle still installs where the real key is pinned
    d = policy.decide(DATA, sign(DATA, real_priv, real), [], [real], real, [])
    assert d.ok and d.key == real and d.pin is None


def test_the_decision_tree():
    priv, pub = keypair()
    blob = sign(DATA, priv, pub)
    assert policy.decide(DATA, None, [], [], None, []).unsigned
    assert "damaged" in policy.decide(DATA, blob[:-5] + b"x\n", [pub], [], pub, []).why
    d = policy.decide(DATA, blob, [pub], [], pub, [])
    assert d.ok and d.pin == pub  # given and verified: pinned once the install succeeds
    d = policy.decide(DATA + b" ", blob, [], [pub], pub, [])
    assert not d.ok and "changed after signing" in d.why
    d = policy.decide(DATA, blob, [], [], pub, [pub.fingerprint[7:]])  # without the prefix too
    assert d.ok and d.pin == pub
    d = policy.decide(DATA, blob, [], [], pub, [], yes=True)
    assert not d.ok and "--yes alone pins nothing" in d.why and pub.fingerprint in d.ask
    _, other = keypair()
    d = policy.decide(DATA, blob, [], [other], pub, [])
    assert not d.ok and "does not trust" in d.why and not d.ask
    # a signature byte changed anywhere (comments included) is no signature
    for i in range(0, len(blob), 7):
        flipped = bytearray(blob)
        flipped[i] ^= 1
        assert not policy.decide(DATA, bytes(flipped), [pub], [], pub, []).ok, i


def test_the_downgrade_rule():
    acc = {"b": {"version": "2.0.0"}}
    assert "older than 2.0.0" in policy.downgrade(acc, "b", "1.9")
    assert policy.downgrade(acc, "b", "2.0.0") == "" and policy.downgrade(acc, "c", "0.1") == ""
    assert policy.downgrade({}, "b", "2.0.0rc1") == ""
    assert "not a PEP 440" in policy.downgrade(acc, "b", "banana")
    assert policy.downgrade("junk", "b", "1.0") == ""


def test_bootstrap_and_the_unpacker_embed_this_very_module():
    """One source: the copy bootstrap.py runs before any bundle code is the module the installer imports."""
    from bundler.bundle import bootstrap_script, unpacker

    text = policy_text = embedded(CONTRACT / "trust.py")
    assert "def decide(" in text and "from .ed25519" not in text
    for script in (bootstrap_script({"name": "b", "version": "1", "model": "m", "port": 1, "host": "h",
                                     "pythons": ["3.11"]}), unpacker("b")):
        assert policy_text in script and embedded(CONTRACT / "ed25519.py", first=True) in script
        compile(script, "embedded", "exec")
    # every line of the module is in the copy, less only its import of what is embedded beside it
    left_out = [ln for ln in (CONTRACT / "trust.py").read_text().splitlines(True) if ln not in text]
    assert [ln.split()[0] for ln in left_out] == ["from", "from"]  # __future__, .ed25519


def test_a_folder_others_can_write_is_named(tmp_path):
    d = tmp_path / "bundle"
    (d / "wheels").mkdir(parents=True)
    (d / "wheels" / "w.whl").write_bytes(b"x")
    assert policy.tree_writable_by_others(d, os.geteuid()) == []
    nobody = 65534
    os.chown(d / "wheels" / "w.whl", nobody, nobody)
    found = policy.tree_writable_by_others(d, 0)
    assert found and "w.whl belongs to" in found[0]
    os.chown(d / "wheels" / "w.whl", 0, 0)
    (d / "wheels").chmod(0o777)
    assert "can be written by others" in policy.tree_writable_by_others(d, 0)[0]
    (d / "wheels").chmod(0o755)
    os.symlink("/etc/passwd", d / "link")
    assert "symbolic link" in policy.tree_writable_by_others(d, 0)[0]
    os.unlink(d / "link")
    # a folder above that another user owns could rename the bundle away and put another in its place
    above = tmp_path / "home"
    above.mkdir()
    os.chown(above, nobody, nobody)
    (above / "b").mkdir()
    assert "belongs to" in policy.writable_by_others(above / "b", 0)
    # /tmp is world-writable but sticky: only the owner of what is in it may rename it
    assert policy.writable_by_others(tmp_path, 0) == ""


@pytest.mark.parametrize("python", ["3.9", "3.10", "3.11", "3.12", "3.13"])
def test_the_policy_runs_on_every_box_python(python, tmp_path):
    """bootstrap.py runs the embedded policy on the box's own python (Debian 11's 3.9 included)."""
    exe = next(iter(sorted(Path.home().glob(f".pyenv/versions/{python}.*/bin/python{python}"))), None)
    if exe is None:
        pytest.skip(f"no python{python} here")
    priv, pub = keypair()
    script = tmp_path / "p.py"
    script.write_text(embedded(CONTRACT / "ed25519.py", first=True) + embedded(CONTRACT / "trust.py") +
                      "import sys\n"
                      f"pub = parse_public_key({pub.to_text()!r})\n"
                      f"d = decide({DATA!r}, {sign(DATA, priv, pub)!r}, [], [pub], None, [])\n"
                      "print(d.ok, pub.fingerprint)\n")
    r = subprocess.run([str(exe), "-I", str(script)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["True", pub.fingerprint], r.stderr
    assert sys.version_info >= (3, 9)


def _grant_acl(path, uid):
    """user::rwx, user:UID:rwx, group::r-x, mask::rwx, other::r-x (what `setfacl -m u:UID:rwx` writes)."""
    import struct

    ents = [(0x01, 7, 0xFFFFFFFF), (0x02, 7, uid), (0x04, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)]
    os.setxattr(path, "system.posix_acl_access",
                struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in ents))


def test_write_granted_by_an_acl_is_seen(tmp_path):
    """The review set `u:nobody:rwx` on the bundle's parent folder: the mode bits (775, group root) hid it,
    and nobody swapped the bundle folder."""
    from bundler.box.layout import check_not_writable_by_others
    from bundler.errors import BundlerError

    d = tmp_path / "parent"
    (d / "bundle").mkdir(parents=True)
    try:
        _grant_acl(d, 65534)
    except OSError:
        pytest.skip("this file system keeps no POSIX ACLs")
    assert "can be written by user nobody (uid 65534) (ACL)" in policy.writable_by_others(d / "bundle", 0)
    assert "(ACL)" in policy.tree_writable_by_others(d, 0)[0]
    with pytest.raises(BundlerError, match=r"\(ACL\)"):
        check_not_writable_by_others(d / "bundle", "the install prefix")
    os.removexattr(d, "system.posix_acl_access")
    d.chmod(0o755)
    assert policy.writable_by_others(d / "bundle", 0) == ""
