"""Bundle signatures: Ed25519 over manifest.json in minisign's format, so the
`minisign` CLI can check them too (`minisign -Vm manifest.json -p KEY.pub`).

Bundling side: a key pair in the user's config directory, made on first use
(`bundler keygen` makes one on purpose); signing uses `cryptography`.
Box side: keys are pinned out of band (install.sh --trust KEYFILE, or files in
trusted.d/); a key shipped in the bundle is never trusted by itself. Checking
uses the pure-Python verifier in ed25519.py, so it runs before anything is
installed.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from .contract import trust as policy
from .errors import BundlerError

SIG_NAME = policy.SIGNATURE
SIGNER_PUB = policy.SIGNER_PUB


PublicKey = policy.PublicKey


def parse_public_key(text: str, where: str) -> PublicKey:
    pub = policy.parse_public_key(text)
    if pub is None:
        raise BundlerError(f"{where}: not a minisign public key", hint="use the .pub file `bundler keygen` printed")
    return pub


def read_public_key(path: Path) -> PublicKey:
    try:
        text = path.read_text()
    except OSError as e:
        raise BundlerError(f"{path}: cannot read the public key ({e.strerror})",
                           hint="pass the .pub file the bundle's maker gave you, e.g. --trust signing-key.pub")
    return parse_public_key(text, str(path))


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "airgap-llm"


def key_paths() -> tuple[Path, Path]:
    env = os.environ.get("AIRGAP_LLM_SIGNING_KEY")
    secret = Path(env) if env else config_dir() / "signing-key.pem"
    return secret, secret.with_name(secret.name.replace(".pem", "") + ".pub")


def keygen(log=print, force: bool = False) -> PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    secret, public = key_paths()
    if secret.exists() and not force:
        raise BundlerError(f"{secret} exists already", hint="keep it, or pass --force to replace it (bundles "
                           "signed with the old key will then need the old public key to install)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    secret.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = PublicKey(os.urandom(8), key.public_key().public_bytes_raw())
    public.write_text(pub.to_text())
    (secret.parent / (secret.name + ".keyid")).write_text(pub.key_id.hex() + "\n")
    log(f"new signing key {pub.fingerprint} (ID {pub.label}): secret {secret} (0600), public {public}")
    log("give the public key to the box's operators out of band: install.sh --trust "
        f"{public.name} pins it")
    return pub


def load_or_create(log=print):
    from cryptography.hazmat.primitives import serialization

    secret, public = key_paths()
    if not secret.exists():
        log("no signing key yet: making one (bundler keygen)")
        keygen(log)
    key = serialization.load_pem_private_key(secret.read_bytes(), password=None)
    return key, read_public_key(public)


def sign(root: Path, log=print) -> PublicKey:
    """Write root/manifest.json.minisig (prehashed, as `minisign -S` does) and signer.pub."""
    key, pub = load_or_create(log)
    data = (root / "manifest.json").read_bytes()
    sig = key.sign(hashlib.blake2b(data, digest_size=64).digest())
    trusted = f"timestamp:{int(time.time())}\tfile:manifest.json\thashed"
    global_sig = key.sign(sig + trusted.encode())
    (root / SIG_NAME).write_bytes(policy.signature_text(b"ED" + pub.key_id + sig, trusted, global_sig))
    (root / SIGNER_PUB).write_text(pub.to_text())
    log(f"signed manifest.json with key {pub.fingerprint}")
    return pub


def read_signature(root: Path) -> policy.Signature | None:
    path = root / SIG_NAME
    if not path.exists():
        return None
    try:
        found = policy.parse_signature(policy.read_once(path))
    except OSError as e:
        raise BundlerError(f"{path}: cannot be read ({e.strerror})", hint="copy the bundle again from its source")
    if found is None:
        raise BundlerError(f"{path}: not a minisign signature as airgap-llm writes it (changed outside the signed "
                           "parts, or damaged)", hint="copy the bundle again from its source")
    return found


def check(root: Path, sig: policy.Signature, pub: PublicKey, data: bytes | None = None) -> bool:
    """Whether `sig` by `pub` signs the manifest: `data`, the bytes the caller parsed (read once, so
    what was checked is what is used), or else root/manifest.json as it is now."""
    if data is None:
        data = (root / "manifest.json").read_bytes()
    return policy.signs(data, sig, pub)
