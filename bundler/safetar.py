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
from pathlib import Path, PurePosixPath

META = ("manifest.json", "SHA256SUMS", "manifest.json.minisig")  # the signature signs the manifest


def _bad_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        return "absolute path"
    if ".." in p.parts:
        return "'..' in the path"
    if "\\" in name or "\x00" in name:
        return "odd characters in the path"
    return ""


def check(tar_path: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None,
          signed_by=None) -> list[str]:
    """Problems found (empty: the tar is the bundle its manifest describes). With dest,
    and only when there are none, the bundle is written under dest/TOP/. signed_by(manifest
    bytes, signature bytes or None) returns why the signature does not hold ("" when it does)."""
    problems: list[str] = []
    with tarfile.open(tar_path, "r:") as tf:
        members = tf.getmembers()
        tops = {PurePosixPath(m.name).parts[0] for m in members if m.name and not _bad_name(m.name)}
        for m in members:
            why = _bad_name(m.name)
            if why:
                problems.append(f"{m.name}: refused: {why}")
            elif not (m.isreg() or m.isdir()):
                kind = "symlink" if m.issym() else "hard link" if m.islnk() else "device or special file"
                problems.append(f"{m.name}: refused: a {kind}")
        if len(tops) != 1:
            return problems + [f"{tar_path}: expected one top directory, found {sorted(tops) or 'none'}"]
        top = tops.pop()
        by_name = {m.name.rstrip("/"): m for m in members}
        man = by_name.get(f"{top}/manifest.json")
        sums = by_name.get(f"{top}/SHA256SUMS")
        if man is None or not man.isreg():
            return problems + [f"{top}/manifest.json: missing from the tar"]
        raw = tf.extractfile(man).read()  # type: ignore[union-attr]
        if signed_by is not None:
            sig = by_name.get(f"{top}/manifest.json.minisig")
            sig_bytes = tf.extractfile(sig).read() if sig is not None and sig.isreg() else None  # type: ignore
            why = signed_by(raw, sig_bytes)
            if why:
                problems.append(f"{top}/manifest.json.minisig: {why}")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            return problems + [f"{top}/manifest.json: not valid JSON ({e})"]
        if sums is not None and sums.isreg():
            text = tf.extractfile(sums).read().decode("utf-8", "replace")  # type: ignore[union-attr]
            want = next((ln.split("  ", 1)[0] for ln in text.splitlines() if ln.endswith("  manifest.json")), None)
            if want and want != hashlib.sha256(raw).hexdigest():
                problems.append(f"{top}/manifest.json: does not match its line in SHA256SUMS")
        else:
            problems.append(f"{top}/SHA256SUMS: missing from the tar")
        expected: dict[str, tuple[int, str]] = {}
        for f in doc.get("files", []):
            for part in f.get("parts") or [f]:
                expected[part["path"]] = (int(part["size"]), part["sha256"])
        dirs = {str(PurePosixPath(p).parent) for p in expected} | set(META)
        for p in list(dirs):
            while p not in (".", ""):
                dirs.add(p)
                p = str(PurePosixPath(p).parent)
        seen = set()
        for m in members:
            if _bad_name(m.name) or not (m.isreg() or m.isdir()):
                continue
            rel = m.name.rstrip("/")[len(top) + 1:]
            if m.name.rstrip("/") == top:
                continue
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
        _write(tf, members, top, Path(dest), expected)
    return []


def _blocks(tf: tarfile.TarFile, m: tarfile.TarInfo):
    src = tf.extractfile(m)
    assert src is not None
    while True:
        block = src.read(4 << 20)
        if not block:
            return
        yield block


def _write(tf: tarfile.TarFile, members: list[tarfile.TarInfo], top: str, dest: Path,
           expected: dict[str, tuple[int, str]]) -> None:
    root = dest / top
    if root.exists():
        raise FileExistsError(f"{root} exists already; remove it or unpack elsewhere")
    tmp = dest / f".{top}.unpacking"
    tmp.mkdir(parents=True)
    try:
        for m in members:
            if not m.isreg():
                continue
            rel = m.name[len(top) + 1:]
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "xb") as f:
                for block in _blocks(tf, m):
                    f.write(block)
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
        verifier = globals().get("signs")  # inlined into NAME.unpack.py by make bundle
        if verifier is None:
            print("error: this copy has no signature checker; use NAME.unpack.py from the bundle's maker, or "
                  "bundler verify DIR --trust KEY after unpacking", file=sys.stderr)
            return 2
        pubs = []
        for k in keys:
            pub = public_key(open(k).read())  # noqa: F821 - inlined beside signs()
            if pub is None:
                print(f"error: {k}: not a minisign public key", file=sys.stderr)
                return 2
            pubs.append(pub)

        def signed_by(data, sig_bytes):
            sig = signature_bytes(sig_bytes) if sig_bytes is not None else None  # noqa: F821
            if sig is None:
                return "missing or damaged (the bundle is not signed)"
            if any(verifier(data, sig, pub) for pub in pubs):
                return ""
            return f"does not verify manifest.json with the key(s) given (it names key {fingerprint(sig[1])})"  # noqa: F821
    problems = check(args[0], args[1] if len(args) > 1 else ".", signed_by)
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
