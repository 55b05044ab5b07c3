"""Step 2: the manifest must be signed by a pinned key (or --allow-unsigned, shouted and
recorded), and not older than the last version accepted for the bundle's name."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import BundlerError
from .layout import Layout, make_dirs, record_made
from .options import Options
from .report import ask, info, shout


def check_trust(bundle: Path, doc: dict[str, Any], layout: Layout, opts: Options, data: bytes) -> dict[str, Any]:
    """`data`: the manifest bytes `doc` was parsed from. Returns what to record once the install
    succeeded (key to pin, version accepted)."""
    from .. import signing

    given = [(p, signing.read_public_key(p)) for p in opts.trust]
    pinned = signing.pinned_keys(layout.trusted)
    sig = signing.read_signature(bundle)
    record: dict[str, Any] = {"version": doc.get("version", "0"), "unsigned": False, "key": "", "pin": None}

    def refuse_unless_allowed(message: str, hint: str, loud: str) -> None:
        if not opts.allow_unsigned:
            raise BundlerError(f"{message}; nothing was changed", hint=hint)
        shout(f"{loud}; installing anyway (--allow-unsigned), recorded in {layout.accepted}")
        record["unsigned"] = True

    if sig is None:
        refuse_unless_allowed(f"{bundle} is not signed ({signing.SIG_NAME} is missing)",
                              "ask for a signed bundle, or pass --allow-unsigned if you checked it another way",
                              "INSTALLING AN UNSIGNED BUNDLE: nothing proves who made it")
        return _check_downgrade(doc, layout, opts, record)
    matching = [(p, k) for p, k in given + pinned if k.key_id == sig.key_id]
    if matching:
        good = [(p, k) for p, k in matching if signing.check(bundle, sig, k, data)]
        if good:
            record["key"] = sig.fingerprint
            if good[0][0].parent != layout.trusted:  # pin the key that verified, not the first with that id
                record["pin"] = str(good[0][0])
        else:
            refuse_unless_allowed(f"the signature of {bundle / 'manifest.json'} does not verify with key "
                                  f"{sig.fingerprint} ({matching[0][0]})",
                                  "the manifest was changed after signing: copy the bundle again",
                                  f"THE SIGNATURE DOES NOT VERIFY (key {sig.fingerprint})")
    elif given or pinned:
        known = ", ".join(sorted({k.fingerprint for _, k in given + pinned}))
        refuse_unless_allowed(f"{bundle} is signed by key {sig.fingerprint}, which this box does not trust "
                              f"(trusted: {known})",
                              "if you expect that signer, get its .pub out of band and pass --trust FILE",
                              f"SIGNED BY AN UNTRUSTED KEY {sig.fingerprint}")
    else:
        offered = bundle / signing.SIGNER_PUB
        pub = signing.read_public_key(offered) if offered.exists() else None
        if pub is None or pub.key_id != sig.key_id or not signing.check(bundle, sig, pub, data):
            raise BundlerError(f"{bundle}: its signature does not verify with the key it names",
                               hint="copy the bundle again from its source")
        interactive = sys.stdin.isatty() and not opts.json
        if opts.trust_fingerprint:
            if opts.trust_fingerprint != sig.fingerprint:
                raise BundlerError(f"the bundle is signed by key {sig.fingerprint}, not {opts.trust_fingerprint} as "
                                   "--trust-fingerprint says; nothing was changed",
                                   hint="check with the bundle's maker which key signed it; do not install it")
            record["key"], record["pin"] = sig.fingerprint, str(offered)
        elif interactive and ask(f"This box trusts no signing key yet. The bundle is signed by key "
                                 f"{sig.fingerprint}. Compare it with what its maker told you. "
                                 "Trust this key from now on? [y/N] "):
            record["key"], record["pin"] = sig.fingerprint, str(offered)
        else:
            refuse_unless_allowed(f"no signing key is pinned on this box, and the bundle is signed by "
                                  f"{sig.fingerprint}",
                                  "pass --trust KEY.pub (the public key you got from the bundle's maker out of "
                                  f"band) or --trust-fingerprint {sig.fingerprint} once you have compared it with "
                                  "what its maker told you" + (" (--yes alone pins nothing)" if opts.yes else ""),
                                  f"KEY {sig.fingerprint} IS NOT PINNED")
    return _check_downgrade(doc, layout, opts, record)


_PEP440 = re.compile(r"^v?(\d+(?:\.\d+)*)(?:[-_.]?(a|alpha|b|beta|c|rc|pre|preview)[-_.]?(\d*))?"
                     r"(?:[-_.]?(post|rev|r)[-_.]?(\d*))?(?:[-_.]?dev[-_.]?(\d*))?$", re.I)
_PRE = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def version_key(v: str) -> tuple:
    """PEP 440 order: 1.0.dev1 < 1.0a1 < 1.0rc1 < 1.0 < 1.0.post1 (a bundle version is a release
    version; dropping the letters made 1.0.0rc1 count as newer than 1.0.0)."""
    m = _PEP440.match(str(v).strip())
    if not m:
        raise BundlerError(f"bundle version {v!r} is not a PEP 440 version", hint="rebuild the bundle with a version "
                           "like 1.2.0 or 1.2.0rc1 in [bundle] version")
    rel = tuple(int(x) for x in m.group(1).split("."))
    while len(rel) > 1 and rel[-1] == 0:
        rel = rel[:-1]
    pre, post, dev = m.group(2), m.group(4), m.group(6)
    if pre:
        pre_k = (_PRE[pre.lower()], int(m.group(3) or 0))
    elif dev is not None and post is None:
        pre_k = (-1, 0)  # 1.0.dev1 comes before 1.0a1
    else:
        pre_k = (3, 0)
    post_k = int(m.group(5) or 0) if post else -1
    dev_k = int(dev or 0) if dev is not None else float("inf")
    return rel, pre_k, post_k, dev_k


def _check_downgrade(doc: dict[str, Any], layout: Layout, opts: Options, record: dict[str, Any]) -> dict[str, Any]:
    accepted = _accepted(layout).get(doc["name"])
    if accepted and version_key(record["version"]) < version_key(accepted["version"]) and not opts.allow_downgrade:
        raise BundlerError(f"{doc['name']} {record['version']} is older than {accepted['version']}, the version this "
                           "box accepted last; nothing was changed",
                           hint="install the newer bundle, or pass --allow-downgrade if you mean to go back")
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
        dest = layout.trusted / f"{record['key']}.pub"
        shutil.copyfile(record["pin"], dest)
        os.chmod(dest, 0o644)
        info(f"pinned signing key {record['key']} in {layout.trusted}")
    acc = _accepted(layout)
    acc[name] = {"version": record["version"], "key": record["key"], "unsigned": record["unsigned"],
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = layout.accepted.with_name(layout.accepted.name + ".tmp")
    tmp.write_text(json.dumps(acc, indent=2) + "\n")
    os.replace(tmp, layout.accepted)
