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

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import ed25519
from .errors import BundlerError
from .manifest import SIGNATURE

SIG_NAME = SIGNATURE
SIGNER_PUB = "signer.pub"  # shown to the operator for an interactive first pin, never trusted by itself


@dataclass(frozen=True)
class PublicKey:
    key_id: bytes  # 8 bytes, minisign's key number
    key: bytes  # 32 bytes

    @property
    def fingerprint(self) -> str:
        return self.key_id[::-1].hex().upper()  # as minisign prints it

    def to_text(self) -> str:
        blob = base64.b64encode(b"Ed" + self.key_id + self.key).decode()
        return f"untrusted comment: minisign public key {self.fingerprint}\n{blob}\n"


def parse_public_key(text: str, where: str) -> PublicKey:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("untrusted comment:")]
    try:
        raw = base64.b64decode(lines[0], validate=True)
    except (IndexError, ValueError):
        raw = b""
    if len(raw) != 42 or raw[:2] != b"Ed":
        raise BundlerError(f"{where}: not a minisign public key", hint="use the .pub file `bundler keygen` printed")
    return PublicKey(raw[2:10], raw[10:])


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
    log(f"new signing key {pub.fingerprint}: secret {secret} (0600), public {public}")
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
    (root / SIG_NAME).write_text(
        f"untrusted comment: signature from airgap-llm key {pub.fingerprint}\n"
        f"{base64.b64encode(b'ED' + pub.key_id + sig).decode()}\n"
        f"trusted comment: {trusted}\n{base64.b64encode(global_sig).decode()}\n")
    (root / SIGNER_PUB).write_text(pub.to_text())
    log(f"signed manifest.json with key {pub.fingerprint}")
    return pub


@dataclass(frozen=True)
class Signature:
    key_id: bytes
    sig: bytes
    trusted: str
    global_sig: bytes
    prehashed: bool

    @property
    def fingerprint(self) -> str:
        return self.key_id[::-1].hex().upper()


def read_signature(root: Path) -> Signature | None:
    path = root / SIG_NAME
    if not path.exists():
        return None
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
        raw = base64.b64decode(lines[1], validate=True)
        trusted = lines[2].split("trusted comment: ", 1)[1]
        global_sig = base64.b64decode(lines[3], validate=True)
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        raise BundlerError(f"{path}: not a minisign signature", hint="copy the bundle again from its source")
    if len(raw) != 74 or raw[:2] not in (b"ED", b"Ed") or len(global_sig) != 64:
        raise BundlerError(f"{path}: not a minisign signature", hint="copy the bundle again from its source")
    found = Signature(raw[2:10], raw[10:], trusted, global_sig, raw[:2] == b"ED")
    # byte for byte what sign() writes: the untrusted comment and the layout are covered by nothing
    # else, so a changed byte there would otherwise pass unseen
    canonical = (f"untrusted comment: signature from airgap-llm key {found.fingerprint}\n"
                 f"{base64.b64encode(raw).decode()}\ntrusted comment: {trusted}\n"
                 f"{base64.b64encode(global_sig).decode()}\n")
    if path.read_bytes() != canonical.encode():
        raise BundlerError(f"{path}: not byte for byte the signature airgap-llm writes (changed outside the "
                           "signed parts)", hint="copy the bundle again from its source")
    return found


def check(root: Path, sig: Signature, pub: PublicKey, data: bytes | None = None) -> bool:
    """Whether `sig` by `pub` signs the manifest: `data`, the bytes the caller parsed (read once, so
    what was checked is what is used), or else root/manifest.json as it is now."""
    if data is None:
        data = (root / "manifest.json").read_bytes()
    msg = hashlib.blake2b(data, digest_size=64).digest() if sig.prehashed else data
    return (sig.key_id == pub.key_id and ed25519.verify(pub.key, msg, sig.sig)
            and ed25519.verify(pub.key, sig.sig + sig.trusted.encode(), sig.global_sig))


def pinned_keys(trusted_dir: Path) -> list[tuple[Path, PublicKey]]:
    keys = []
    if trusted_dir.is_dir():
        for p in sorted(trusted_dir.glob("*.pub")):
            keys.append((p, read_public_key(p)))
    return keys
