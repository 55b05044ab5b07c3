"""Check a bundle tar against the manifest inside it, and extract it safely.

Standard library only: `make bundle` also writes this file beside the tar as
NAME.unpack.py, so an operator can run `python3 NAME.unpack.py NAME.tar` on a
box that has nothing else. Nothing is written unless every check passes:

- only regular files and directories (no symlinks, hard links, devices, FIFOs);
- names relative, without '..', under the bundle's top directory;
- every file named by manifest.json (or a part of a split file, or the manifest
  and SHA256SUMS themselves), with the size and sha256 the manifest gives;
- manifest.json matching its line in SHA256SUMS; nothing the manifest lists missing.

Files are written by this code (never tarfile.extract), so tarfile's own
filter bypasses (CVE-2025-4517 and friends) do not apply.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path

from .contract.trust import parse_public_key, parse_signature, signs  # not embedded: NAME.unpack.py inlines them

META = ("manifest.json", "SHA256SUMS", "manifest.json.minisig")  # the signature signs the manifest


def parts_of(name, is_dir=False):
    """The one normalisation of a path, for the check and the write alike: a tuple of plain names, or
    a string saying why `name` is refused. Only a directory member may end in one '/'."""
    if not isinstance(name, str) or not name:
        return "an empty name"
    if name.startswith("/"):
        return "absolute path"
    if is_dir and name.endswith("/"):
        name = name[:-1]
    if len(name.encode("utf-8", "surrogateescape")) > 4096:
        return "a path over 4096 bytes"
    if any(c in name for c in "\\\x00") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "odd characters in the path"
    parts = tuple(name.split("/"))
    if ".." in parts:
        return "'..' in the path"
    if any(p in ("", ".") for p in parts):
        return "an empty or '.' part in the path"
    if any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        return "a name over 255 bytes"
    return parts


def _bad_name(name: str, is_dir: bool = False) -> str:
    p = parts_of(name, is_dir)
    return p if isinstance(p, str) else ""


def check(tar_path, dest=None, signed_by=None):
    """Problems found (empty: the tar is the bundle its manifest describes). With dest,
    and only when there are none, the bundle is written under dest/TOP/. signed_by(manifest
    bytes, signature bytes or None) returns why the signature does not hold ("" when it does)."""
    try:
        with tarfile.open(tar_path, "r:") as tf:
            return _check(tf, tar_path, dest, signed_by)
    except (tarfile.TarError, EOFError, UnicodeError) as e:
        return [f"{tar_path}: not a whole tar ({e.__class__.__name__}: {e}); it may be truncated"]
    except ValueError as e:  # a member that changed between its check and its extraction (_write)
        return [f"{tar_path}: {e}; nothing was written"]
    except OSError as e:
        if e.filename is None or str(e.filename) == str(tar_path):
            return [f"{tar_path}: cannot be read ({e.strerror or e})"]
        raise  # the destination: main() says so


MAX_MEMBERS = 200_000  # a bundle has hundreds; a tar of millions of headers is an attempt to exhaust memory


def _check(tf, tar_path, dest, signed_by):
    problems = []
    members = []
    for m in tf:  # read the headers one by one, and stop at the limit instead of loading them all
        members.append(m)
        if len(members) > MAX_MEMBERS:
            return [f"{tar_path}: more than {MAX_MEMBERS} members; a bundle has far fewer: refused"]
    norm = {}  # member → its parts, for every member whose name is plain
    for m in members:
        p = parts_of(m.name, m.isdir())
        if isinstance(p, str):
            problems.append(f"{m.name!r}: refused: {p}")
        elif m.issparse():
            problems.append(f"{m.name}: refused: a sparse member (it would expand far beyond its size in the tar)")
        elif not (m.isreg() or m.isdir()):
            kind = "symlink" if m.issym() else "hard link" if m.islnk() else "device or special file"
            problems.append(f"{m.name}: refused: a {kind}")
        else:
            norm[id(m)] = p
    tops = {p[0] for p in norm.values()}
    if len(tops) != 1:
        return problems + [f"{tar_path}: expected one top directory, found {sorted(tops) or 'none'}"]
    top = tops.pop()
    by_rel = {}
    for m in members:
        p = norm.get(id(m))
        if p is None or len(p) == 1:
            if p is not None and not m.isdir():
                problems.append(f"{m.name}: refused: a file where the top directory should be")
            continue
        rel = "/".join(p[1:])
        if rel in by_rel:
            problems.append(f"{m.name}: refused: a second member with the path {rel}")
            continue
        by_rel[rel] = m
    man, sums = by_rel.get("manifest.json"), by_rel.get("SHA256SUMS")
    if man is None or not man.isreg():
        return problems + [f"{top}/manifest.json: missing from the tar"]
    if man.size > 64 << 20:
        return problems + [f"{top}/manifest.json: {man.size} bytes, too large to be a manifest"]
    raw = tf.extractfile(man).read()
    if signed_by is not None:
        sig = by_rel.get("manifest.json.minisig")
        sig_bytes = tf.extractfile(sig).read(4096) if sig is not None and sig.isreg() else None
        why = signed_by(raw, sig_bytes)
        if why:
            problems.append(f"{top}/manifest.json.minisig: {why}")
    try:
        doc = json.loads(raw)
        from_base = set((doc.get("delta") or {}).get("from_base") or ())  # a delta's: not in the tar
        listed = [(part["path"], int(part["size"]), str(part["sha256"]))
                  for f in doc["files"] if f["path"] not in from_base for part in (f.get("parts") or [f])]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return problems + [f"{top}/manifest.json: not a bundle manifest ({e.__class__.__name__}: {e})"]
    if sums is not None and sums.isreg():
        text = tf.extractfile(sums).read(64 << 20).decode("utf-8", "replace")
        want = next((ln.split("  ", 1)[0] for ln in text.splitlines() if ln.endswith("  manifest.json")), None)
        if want and want != hashlib.sha256(raw).hexdigest():
            problems.append(f"{top}/manifest.json: does not match its line in SHA256SUMS")
    else:
        problems.append(f"{top}/SHA256SUMS: missing from the tar")
    expected = {}
    for path, size, sha in listed:
        p = parts_of(path)
        if isinstance(p, str):
            problems.append(f"{top}/manifest.json: names the path {path!r}: refused: {p}")
            continue
        expected["/".join(p)] = (size, sha)
    if problems:
        return problems
    dirs = set()
    for rel in list(expected) + list(META):
        p = rel.split("/")[:-1]
        for i in range(1, len(p) + 1):
            dirs.add("/".join(p[:i]))
    seen = set()
    for rel, m in by_rel.items():
        if m.isdir():
            if rel not in dirs:
                problems.append(f"{m.name}: a directory the manifest does not name")
            continue
        if rel in META:
            continue
        if rel not in expected:
            problems.append(f"{m.name}: not in the manifest")
            continue
        seen.add(rel)
        size, sha = expected[rel]
        if m.size != size:
            problems.append(f"{m.name}: size mismatch: expected {size} bytes, got {m.size}")
            continue
        h = hashlib.sha256()
        for block in _blocks(tf, m):
            h.update(block)
        if h.hexdigest() != sha:
            problems.append(f"{m.name}: sha256 mismatch: expected {sha}, got {h.hexdigest()}")
    for rel in sorted(set(expected) - seen):
        problems.append(f"{top}/{rel}: missing (the manifest lists it)")
    if problems or dest is None:
        return problems
    _write(tf, by_rel, top, Path(dest), expected)
    return []


def signed_by_one_of(pubs):
    """A signed_by for check(): why the manifest's signature is not one of `pubs`' ("" when it is)."""
    def signed_by(data, sig_bytes):
        sig = parse_signature(sig_bytes) if sig_bytes is not None else None
        if sig is None:
            return "missing or damaged (the bundle is not signed)"
        if any(signs(data, sig, pub) for pub in pubs):
            return ""
        return (f"does not verify manifest.json with the key(s) given ({', '.join(p.fingerprint for p in pubs)}; "
                f"it names key ID {sig.label})")
    return signed_by


def _blocks(tf: tarfile.TarFile, m: tarfile.TarInfo):
    src = tf.extractfile(m)
    assert src is not None
    while True:
        block = src.read(4 << 20)
        if not block:
            return
        yield block


def _write(tf, by_rel, top, dest, expected):
    """Every regular member at dest/.TOP.unpacking/REL (its path from the one normalisation above),
    each file new (O_EXCL, no link followed) and hashed as it is written: the tar is read a second time
    here, and a file changed since its check (a share that answers twice differently) is refused; then
    the folder renamed to dest/TOP."""
    root = dest / top
    if root.exists() or root.is_symlink():
        raise FileExistsError(f"{root} exists already; remove it or unpack elsewhere")
    tmp = dest / f".{top}.unpacking"
    tmp.mkdir(mode=0o755, parents=True)
    try:
        for rel, m in sorted(by_rel.items()):
            if not m.isreg():
                continue
            out = tmp.joinpath(*rel.split("/"))
            os.makedirs(out.parent, mode=0o755, exist_ok=True)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                for block in _blocks(tf, m):
                    h.update(block)
                    f.write(block)
            if rel in expected and h.hexdigest() != expected[rel][1]:
                raise ValueError(f"{m.name} changed between its check and its extraction (sha256 {h.hexdigest()}, "
                                 f"expected {expected[rel][1]})")
            os.chmod(out, 0o755 if m.mode & 0o111 else 0o644)
        os.replace(tmp, root)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    keys = []
    while "--trust" in args:
        i = args.index("--trust")
        if i + 1 >= len(args):
            args = []
            break
        keys.append(args[i + 1])
        del args[i:i + 2]
    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        print("usage: python3 unpack.py [--trust KEY.pub] BUNDLE.tar [DEST]\n\nChecks every member of the tar "
              "against the manifest inside it and, with --trust, the manifest's signature with that key; then (only "
              "if all is well) writes the bundle under DEST (default: here).")
        return 0 if args and args[0] in ("-h", "--help") else 2
    signed_by = None
    if keys:
        pubs = []
        for k in keys:
            try:
                pub = parse_public_key(open(k).read(4096))
            except (OSError, UnicodeError) as e:
                print(f"error: {k}: cannot read the public key ({e})", file=sys.stderr)
                return 2
            if pub is None:
                print(f"error: {k}: not a minisign public key", file=sys.stderr)
                return 2
            pubs.append(pub)
        signed_by = signed_by_one_of(pubs)
    try:
        problems = check(args[0], args[1] if len(args) > 1 else ".", signed_by)
    except OSError as e:  # the destination: exists already, not writable, full
        print(f"error: {e}; nothing was left half-written", file=sys.stderr)
        print("hint: unpack into another folder, or remove what is in the way", file=sys.stderr)
        return 1
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"error: {args[0]}: {len(problems)} problem(s); nothing was written", file=sys.stderr)
        print("hint: copy the tar again from its source", file=sys.stderr)
        return 1
    print("unpacked and verified" + (", signature checked" if keys else "") +
          "; next: cd into the bundle and run ./install.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
