"""Step 2: the manifest must be signed by a pinned key (or --allow-unsigned, shouted and
recorded), and not older than the last version accepted for the bundle's name."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..contract import trust as policy
from ..errors import BundlerError
from ..files import atomic_write
from .boot import read_or_none
from .layout import Layout, make_dirs, record_made
from .options import Options
from .report import ask, info, shout


def check_trust(bundle: Path, doc: dict[str, Any], layout: Layout, opts: Options, data: bytes,
                sig_blob: bytes | None = None, offered_text: str | None = None) -> dict[str, Any]:
    """`data`: the manifest bytes `doc` was parsed from; `sig_blob`/`offered_text`: the signature and
    signer.pub as bootstrap.py read them once (else read here, once). The decision is
    contract/trust.py's, the same code bootstrap.py ran. Returns what to record once the install
    succeeded (key to pin, version accepted)."""
    given = [_given_key(p) for p in opts.trust]
    pinned = [k for d in policy.trust_folders(str(layout.etc), os.geteuid()) for _, k in policy.pinned_keys(d)
              if k is not None]
    if sig_blob is None:
        sig_blob = read_or_none(bundle / policy.SIGNATURE, 4096)
    if offered_text is None:
        raw = read_or_none(bundle / policy.SIGNER_PUB, 4096)
        offered_text = raw.decode("utf-8", "replace") if raw is not None else ""
    offered = policy.parse_public_key(offered_text) if offered_text else None
    wanted = [opts.trust_fingerprint] if opts.trust_fingerprint else []
    d = policy.decide(data, sig_blob, given, pinned, offered, wanted, yes=opts.yes)
    record: dict[str, Any] = {"version": doc.get("version", "0"), "unsigned": False, "key": "", "pin": None}
    if not d.ok and d.ask and sys.stdin.isatty() and not opts.json and ask(d.ask):
        d.ok = True
    if d.ok:
        record["key"] = d.key.fingerprint
        record["pin"] = d.pin.to_text() if d.pin is not None else None
    elif not opts.allow_unsigned or not d.unsigned:  # never over a wrong signature or an untrusted key
        raise BundlerError(f"{d.why}; nothing was changed" if "nothing was changed" not in d.why else d.why,
                           hint=d.hint)
    else:
        loud = ("INSTALLING AN UNSIGNED BUNDLE: nothing proves who made it" if d.unsigned else
                f"NOT VOUCHED FOR BY A KEY THIS BOX TRUSTS: {d.why}")
        shout(f"{loud}; installing anyway (--allow-unsigned), recorded in {layout.accepted}")
        record["unsigned"] = True
    return _check_downgrade(doc, layout, opts, record)


def _given_key(path: Path) -> policy.PublicKey:
    raw = read_or_none(path, 4096)
    if raw is None:
        raise BundlerError(f"{path}: cannot read the public key (no such file)",
                           hint="pass the .pub file the bundle's maker gave you, e.g. --trust signing-key.pub")
    pub = policy.parse_public_key(raw.decode("utf-8", "replace"))
    if pub is None:
        raise BundlerError(f"{path}: not a minisign public key", hint="use the .pub file `bundler keygen` printed")
    return pub


def version_key(v: str) -> tuple:
    """PEP 440 order: 1.0.dev1 < 1.0a1 < 1.0rc1 < 1.0 < 1.0.post1 (contract/trust.py)."""
    k = policy.version_key(v)
    if k is None:
        raise BundlerError(f"bundle version {v!r} is not a PEP 440 version", hint="rebuild the bundle with a version "
                           "like 1.2.0 or 1.2.0rc1 in [bundle] version")
    return k


def _check_downgrade(doc: dict[str, Any], layout: Layout, opts: Options, record: dict[str, Any]) -> dict[str, Any]:
    why = policy.downgrade(_accepted(layout), doc["name"], record["version"])
    if why and not (opts.allow_downgrade and "older than" in why):
        raise BundlerError(why, hint="install the newer bundle, or pass --allow-downgrade if you mean to go back"
                           if "older than" in why else "rebuild the bundle with a version like 1.2.0 in [bundle]")
    return record


def _accepted(layout: Layout) -> dict[str, Any]:
    try:
        return json.loads(layout.accepted.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def remember(layout: Layout, name: str, record: dict[str, Any]) -> None:
    """Pin the key the operator gave (or confirmed) and record the version accepted."""
    if record.get("pin"):
        record_made(layout, make_dirs(layout.trusted, 0o755))
        pub = policy.parse_public_key(record["pin"])
        dest = layout.trusted / policy.pin_name(pub)
        atomic_write(dest, pub.to_text().encode(), 0o644)  # the bytes that verified, not a file read again
        info(f"pinned signing key {record['key']} in {layout.trusted}")
    acc = _accepted(layout)
    acc[name] = {"version": record["version"], "key": record["key"], "unsigned": record["unsigned"],
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(layout.accepted, (json.dumps(acc, indent=2) + "\n").encode(), 0o644)
