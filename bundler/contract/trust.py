"""The trust policy: the one place that decides whether this box trusts a bundle.

Standard library only. bootstrap.py (the first Python the box runs, before any of the bundle's
code) embeds this file verbatim after contract/ed25519.py, and the installer imports it: one
decision tree, one minisign parser, one wording (tests/unit/test_trust_policy.py proves the
embedded copy is this file). Its imports of what is embedded beside it are left out of the copy.

Functions here decide and return what they found; they never raise for a refusal, print or exit:
the caller words the outcome for its own exit path.

- A key's identity is the SHA-256 of its 32 public-key bytes (`fingerprint`, shown like
  OpenSSH's "SHA256:…"). minisign's 8-byte key ID is a label anyone can copy: it is shown only as
  such, and a key that carries a trusted key's ID but other bytes is refused naming both.
- Nothing that runs or is installed is read twice: `read_once` takes a file's bytes through one
  open descriptor that refuses links; callers keep and use those bytes.
- A folder someone other than the installing user (or root) could write is refused before
  anything in it is trusted (`writable_by_others`).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import re
import stat

from .ed25519 import verify  # not embedded: bootstrap.py inlines contract/ed25519.py above this file

SIGNATURE = "manifest.json.minisig"
SIGNER_PUB = "signer.pub"  # shown to the operator for a first pin; never trusted because it is there
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a bundle's name: a folder and a unit name
MAX_MANIFEST = 64 << 20


# ---- reading once -------------------------------------------------------------------------

def read_once(path, limit=MAX_MANIFEST):
    """The bytes of a regular file, read through one descriptor that refuses a symbolic link
    (O_NOFOLLOW) and anything but a regular file (opened without blocking, so a FIFO is refused, not
    waited on). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(21, "not a regular file", str(path))
        chunks, total = [], 0
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                return b"".join(chunks)
            total += len(block)
            if total > limit:
                raise OSError(27, f"larger than {limit} bytes", str(path))
            chunks.append(block)
    finally:
        os.close(fd)


# ---- minisign keys and signatures ---------------------------------------------------------

class PublicKey:
    """A minisign Ed25519 public key: `key` (32 bytes) is its identity; `key_id` is minisign's label."""

    __slots__ = ("key_id", "key")

    def __init__(self, key_id, key):
        self.key_id, self.key = bytes(key_id), bytes(key)

    def __eq__(self, other):
        return isinstance(other, PublicKey) and (self.key_id, self.key) == (other.key_id, other.key)

    def __hash__(self):
        return hash((self.key_id, self.key))

    @property
    def fingerprint(self):
        return fingerprint(self.key)

    @property
    def label(self):
        return key_label(self.key_id)

    def to_text(self):
        blob = base64.b64encode(b"Ed" + self.key_id + self.key).decode()
        return f"untrusted comment: minisign public key {self.label}, {self.fingerprint}\n{blob}\n"


def fingerprint(key):
    """A public key's identity: SHA-256 of its 32 bytes, as OpenSSH prints one ("SHA256:" + base64)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(bytes(key)).digest()).decode().rstrip("=")


def key_label(key_id):
    """minisign's key ID as its own tool prints it: a name, not an identity (anyone can copy it)."""
    return bytes(key_id)[::-1].hex().upper()


def same_fingerprint(given, fp):
    """Whether the operator's `given` text names fingerprint `fp` (the "SHA256:" prefix optional)."""
    g = str(given).strip()
    g = g[7:] if g.upper().startswith("SHA256:") else g
    return g.rstrip("=") == fp[7:]


def parse_public_key(text):
    """A PublicKey from a minisign .pub file's text, or None."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.startswith("untrusted comment:")]
    try:
        raw = base64.b64decode(lines[0], validate=True)
    except (IndexError, ValueError):
        return None
    return PublicKey(raw[2:10], raw[10:]) if len(raw) == 42 and raw[:2] == b"Ed" else None


class Signature:
    __slots__ = ("prehashed", "key_id", "sig", "trusted", "global_sig")

    def __init__(self, prehashed, key_id, sig, trusted, global_sig):
        self.prehashed, self.key_id, self.sig, self.trusted, self.global_sig = (
            prehashed, key_id, sig, trusted, global_sig)

    @property
    def label(self):
        return key_label(self.key_id)


def signature_text(raw, trusted, global_sig):
    """Byte for byte what the bundler writes as manifest.json.minisig."""
    return (f"untrusted comment: signature from airgap-llm key {key_label(raw[2:10])}\n"
            f"{base64.b64encode(raw).decode()}\ntrusted comment: {trusted}\n"
            f"{base64.b64encode(global_sig).decode()}\n").encode()


def parse_signature(blob):
    """A Signature from manifest.json.minisig's bytes, or None. Only byte for byte what the
    bundler writes is accepted: the untrusted comment and the layout are covered by nothing else."""
    try:
        lines = blob.decode("utf-8").splitlines()
        raw = base64.b64decode(lines[1], validate=True)
        trusted = lines[2].split("trusted comment: ", 1)[1]
        global_sig = base64.b64decode(lines[3], validate=True)
    except (IndexError, ValueError, AttributeError):
        return None
    if len(raw) != 74 or raw[:2] not in (b"ED", b"Ed") or len(global_sig) != 64:
        return None
    if blob != signature_text(raw, trusted, global_sig):
        return None
    return Signature(raw[:2] == b"ED", raw[2:10], raw[10:], trusted, global_sig)


def signs(data, sig, pub):
    """Whether `sig` is `pub`'s signature over `data` (minisign: the file, or its BLAKE2b-512
    for a prehashed signature, then the signature and its trusted comment)."""
    msg = hashlib.blake2b(data, digest_size=64).digest() if sig.prehashed else data
    return (sig.key_id == pub.key_id and verify(pub.key, msg, sig.sig)
            and verify(pub.key, sig.sig + sig.trusted.encode(), sig.global_sig))


# ---- the decision --------------------------------------------------------------------------

class Decision:
    """ok: a key this box trusts (or the operator just confirmed) signs the manifest. why/hint:
    the refusal, worded for the operator. key: the key that signs. pin: a key to pin once the
    install succeeded (the bytes themselves, never a file to read again). ask: the question to
    put to an operator at a terminal, when that is the only way left."""

    __slots__ = ("ok", "why", "hint", "key", "pin", "ask", "unsigned")

    def __init__(self, ok, why="", hint="", key=None, pin=None, ask="", unsigned=False):
        self.ok, self.why, self.hint, self.key, self.pin, self.ask, self.unsigned = (
            ok, why, hint, key, pin, ask, unsigned)


TRUST_HINT = ("pass --trust KEY.pub (the public key you got from the bundle's maker out of band), or "
              "--trust-fingerprint SHA256:… once you compared it with what its maker told you")


def decide(data, sig_blob, given, pinned, offered, wanted, yes=False):
    """Whether this box trusts the manifest `data`.

    sig_blob: manifest.json.minisig's bytes (None: missing); given: keys named by --trust;
    pinned: keys in trusted.d; offered: the key the bundle carries (signer.pub), trusted only if
    its fingerprint is among `wanted` (--trust-fingerprint) or the operator says yes to `ask`."""
    if sig_blob is None:
        return Decision(False, "the bundle is not signed (manifest.json.minisig is missing)",
                        "ask for a signed bundle, or pass --allow-unsigned if you checked it another way",
                        unsigned=True)
    sig = parse_signature(sig_blob)
    if sig is None:
        return Decision(False, "manifest.json.minisig is damaged: not a minisign signature as airgap-llm writes it",
                        "copy the bundle again from its source")
    trusted = list(given) + list(pinned)
    for pub in trusted:
        if signs(data, sig, pub):
            return Decision(True, key=pub, pin=pub if pub in given and pub not in pinned else None)
    offered_ok = offered is not None and signs(data, sig, offered)
    same_id = [pub for pub in trusted if pub.key_id == sig.key_id]
    if same_id and offered_ok and offered.key not in {p.key for p in same_id}:
        return Decision(False, f"the bundle is signed by key {offered.fingerprint}, which carries the key ID "
                        f"{sig.label} of the trusted key {same_id[0].fingerprint} but is another key: a key ID is a "
                        "label anyone can copy; nothing was changed",
                        "do not install it; ask the bundle's maker which key signed it")
    if same_id:
        return Decision(False, f"manifest.json.minisig does not verify manifest.json with key {same_id[0].fingerprint} "
                        f"(ID {sig.label}): one of the two was changed after signing",
                        "copy the bundle again from its source")
    wanted = [w for w in wanted if str(w).strip()]
    if wanted:
        if offered_ok and any(same_fingerprint(w, offered.fingerprint) for w in wanted):
            return Decision(True, key=offered, pin=offered)
        signer = offered.fingerprint if offered_ok else f"key ID {sig.label}"
        return Decision(False, f"the bundle is signed by {signer}, not {' or '.join(wanted)} as --trust-fingerprint "
                        "says; nothing was changed", "check with the bundle's maker which key signed it; do not "
                        "install it")
    signer = offered.fingerprint if offered_ok else f"a key with ID {sig.label}"
    if trusted:
        known = ", ".join(sorted({p.fingerprint for p in trusted}))
        return Decision(False, f"manifest.json.minisig: signed by {signer}, which this box does not trust "
                        f"(trusted: {known})",
                        "if you expect that signer, get its .pub out of band and pass --trust FILE")
    ask = ""
    if offered_ok:
        ask = (f"This box trusts no signing key yet. The bundle is signed by key {offered.fingerprint}. Compare "
               "it with what its maker told you. Trust this key from now on? [y/N] ")
    return Decision(False, f"manifest.json.minisig: signed by {signer}, and no signing key is pinned on this box" +
                    (" (--yes alone pins nothing)" if yes else ""), TRUST_HINT, ask=ask,
                    key=offered if offered_ok else None, pin=offered if offered_ok else None)


# ---- versions: an older bundle needs --allow-downgrade -----------------------------------------

_PEP440 = re.compile(r"^v?(\d+(?:\.\d+)*)(?:[-_.]?(a|alpha|b|beta|c|rc|pre|preview)[-_.]?(\d*))?"
                     r"(?:[-_.]?(post|rev|r)[-_.]?(\d*))?(?:[-_.]?dev[-_.]?(\d*))?$", re.I)
_PRE = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def version_key(v):
    """PEP 440 order (1.0.dev1 < 1.0a1 < 1.0rc1 < 1.0 < 1.0.post1), or None if `v` is not one."""
    m = _PEP440.match(str(v).strip())
    if not m:
        return None
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


def downgrade(accepted, name, version):
    """'' if `version` of bundle `name` may be installed after what accepted.json (`accepted`, its
    parsed content) records, else why not. Checked by bootstrap.py before any of the new bundle's
    code runs, so an old bundle cannot bring older rules."""
    new = version_key(version)
    if new is None:
        return f"bundle version {version!r} is not a PEP 440 version"
    last = accepted.get(name) if isinstance(accepted, dict) else None
    old = version_key(last.get("version", "")) if isinstance(last, dict) else None
    if old is not None and new < old:
        return (f"{name} {version} is older than {last['version']}, the version this box accepted last; nothing was "
                "changed")
    return ""


# ---- where the box keeps its trust ----------------------------------------------------------

CONFIG_ROOT = "/etc/airgap-llm"
DEFAULT_PREFIX = "/opt/airgap-llm"


def config_dir(prefix, config, euid):
    """The folder of trusted.d/ and accepted.json: --config-dir, else PREFIX/etc for a prefix given,
    else /etc/airgap-llm as root; '' when nothing is known (no root, no prefix)."""
    if config:
        return os.path.abspath(os.path.expanduser(str(config)))
    if prefix:
        return os.path.join(os.path.abspath(os.path.expanduser(str(prefix))), "etc")
    return CONFIG_ROOT if euid == 0 else ""


def trust_folders(folder, euid):
    """Where keys pinned on this box live: the config folder's trusted.d, and as root always the box-wide
    one too (a new --prefix must not look like a box that trusts nothing)."""
    out = [os.path.join(folder, "trusted.d")] if folder else []
    box = os.path.join(CONFIG_ROOT, "trusted.d")
    if euid == 0 and box not in out:
        out.append(box)
    return out


def trust_store_problems(folder, euid):
    """Why the keys and the accepted-versions record this decision would read cannot be trusted: a
    folder or file of them that someone other than this user or root can change ('' when none)."""
    paths = [os.path.join(folder, "accepted.json")] if folder else []
    for d in trust_folders(folder, euid):
        paths.append(d)
        try:
            paths += [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".pub")]
        except OSError:
            pass
    for p in paths:
        if os.path.lexists(p):
            why = writable_by_others(p, euid)
            if why:
                return f"{p}: {why}"
    return ""


def pinned_keys(folder):
    """[(path, PublicKey)] of the .pub files in trusted.d; a file that is no key is returned as (path, None)."""
    out = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for n in names:
        if n.endswith(".pub"):
            p = os.path.join(folder, n)
            try:
                out.append((p, parse_public_key(read_once(p, 4096).decode("utf-8", "replace"))))
            except OSError:
                out.append((p, None))
    return out


def pin_name(pub):
    """The file a pinned key is kept in: its fingerprint, made safe for a file name."""
    return "sha256-" + hashlib.sha256(pub.key).hexdigest()[:32] + ".pub"


# ---- who could have written it ------------------------------------------------------------

def _group_is_only(gid, uids):
    """Whether only the users `uids` (and root) can be in group `gid` (a per-user group)."""
    try:
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        return False
    allowed = set()
    for u in uids:
        try:
            allowed.add(pwd.getpwuid(u).pw_name)
        except KeyError:
            pass
    if any(m not in allowed | {"root"} for m in members):
        return False
    return all(p.pw_uid in uids or p.pw_uid == 0 for p in pwd.getpwall() if p.pw_gid == gid)


_ACL_USER, _ACL_GROUP, _ACL_GROUP_OBJ, _ACL_MASK = 0x02, 0x08, 0x04, 0x10


def acl_writers(path, uids, gid, follow=False):
    """Who other than `uids` a POSIX ACL on `path` lets write (named users and groups, the owning group
    under the mask), '' when nobody: the mode bits alone showed the mask, not who holds it."""
    import struct

    try:
        raw = os.getxattr(path, "system.posix_acl_access", follow_symlinks=follow)
    except OSError:
        return ""  # no ACL (or none the file system keeps): the mode bits say it all
    if len(raw) < 4 or (len(raw) - 4) % 8:
        return f"{path} has an ACL this check cannot read"
    entries = [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 7)
    for tag, perm, ident in entries:
        if not perm & mask & 2:
            continue
        if tag == _ACL_USER and ident not in uids:
            return f"{path} can be written by {_user(ident)} (ACL)"
        if tag in (_ACL_GROUP, _ACL_GROUP_OBJ):
            g = gid if tag == _ACL_GROUP_OBJ else ident
            if not _group_is_only(g, uids):
                return f"{path} can be written by group {_group(g)} (ACL)"
    return ""


def writable_by_others(path, euid, follow=False):
    """Why someone other than user `euid` or root could change `path`, or ''. The path itself and
    every folder above it (a folder above can rename what is below; a sticky one, like /tmp, lets
    only the owner rename what is theirs)."""
    uids = {euid, 0}
    p = os.path.abspath(str(path))
    child_uid = None
    while True:
        try:
            st = os.stat(p) if follow else os.lstat(p)
        except OSError as e:
            return f"{p}: cannot be checked ({e.strerror})"
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            return f"{p} is a symbolic link"
        sticky = stat.S_ISDIR(mode) and mode & stat.S_ISVTX and child_uid in uids
        if st.st_uid not in uids:
            who = _user(st.st_uid)
            return f"{p} belongs to {who}"
        if mode & 0o002 and not sticky:
            return f"{p} can be written by everyone (mode {stat.S_IMODE(mode):o})"
        if mode & 0o020 and not sticky and not _group_is_only(st.st_gid, uids):
            return f"{p} can be written by group {_group(st.st_gid)} (mode {stat.S_IMODE(mode):o})"
        acl = "" if sticky or stat.S_ISLNK(mode) else acl_writers(p, uids, st.st_gid, follow)
        if acl:
            return acl
        parent = os.path.dirname(p)
        if parent == p:
            return ""
        p, child_uid, follow = parent, st.st_uid, True


def tree_writable_by_others(root, euid):
    """writable_by_others for `root` and everything under it (the first few problems)."""
    problems = []
    why = writable_by_others(root, euid)
    if why:
        return [why]
    uids = {euid, 0}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
            except OSError as e:
                problems.append(f"{p}: cannot be checked ({e.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{p} is a symbolic link")
            elif st.st_uid not in uids:
                problems.append(f"{p} belongs to {_user(st.st_uid)}")
            elif st.st_mode & 0o002 or (st.st_mode & 0o020 and not _group_is_only(st.st_gid, uids)):
                problems.append(f"{p} can be written by others (mode {stat.S_IMODE(st.st_mode):o})")
            else:
                acl = acl_writers(p, uids, st.st_gid)
                if acl:
                    problems.append(acl)
            if len(problems) >= 5:
                return problems
    return problems


def _user(uid):
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group(gid):
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)
