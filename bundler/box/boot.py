"""What bootstrap.py hands the installer: a private folder (0700, ours) holding the copies it
checked — manifest.json and its signature as read once, signer.pub, the installer's own wheels —
named by AIRGAP_LLM_BOOT_DIR; and the installer's import path, AIRGAP_LLM_BOOT_PATH. The installer
reads the manifest from there, never again from the bundle folder, and works from there (its
current folder, so no child python finds a module in the operator's folder)."""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import sys
from pathlib import Path

from ..contract import trust as policy
from ..errors import BundlerError

# the installer from the checked copies only: -I leaves the current folder and PYTHON* variables out, -S
# site-packages (and any .pth file in them)
RUN = ('import os, sys; sys.path[:0] = os.environ["AIRGAP_LLM_BOOT_PATH"].split(os.pathsep); '
       'import runpy; runpy.run_module("bundler.box", run_name="__main__", alter_sys=True)')


def folder() -> Path | None:
    """The private folder bootstrap.py made, if this installer was started by it and it is safe."""
    d = os.environ.get("AIRGAP_LLM_BOOT_DIR", "")
    if not d:
        return None
    try:
        st = os.lstat(d)
    except OSError:
        st = None
    if (st is None or not os.path.basename(d).startswith("airgap-llm-boot-") or not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077):
        raise BundlerError(f"AIRGAP_LLM_BOOT_DIR={d} is not the private folder bootstrap.py makes; nothing was changed",
                           hint="run ./install.sh, which starts the installer through bootstrap.py")
    return Path(d)


def clean_on_exit() -> None:
    """Remove the private folder when the installer that bootstrap.py started ends, however it ends
    (--help and a usage error too); a child installer, such as the egress audit's, leaves it to its parent."""
    d = folder()
    if d is not None and not os.environ.get("AIRGAP_LLM_BOOT_CHILD"):
        atexit.register(shutil.rmtree, str(d), True)


def settle() -> None:
    """Work from the private folder (or /) once the options are read."""
    os.chdir(folder() or "/")


def installer_argv() -> list[str]:
    """This installer started again (the egress audit's child), from the same checked copies."""
    return [sys.executable, "-I", "-S", "-c", RUN]


def installer_env() -> dict[str, str]:
    env = dict(os.environ, AIRGAP_LLM_BOOT_CHILD="1")
    if "AIRGAP_LLM_BOOT_PATH" not in env:  # started without bootstrap.py (tests, a checkout): where we are
        pkg = str(Path(__file__).resolve().parents[2])
        env["AIRGAP_LLM_BOOT_PATH"] = os.pathsep.join([pkg, *(p for p in sys.path if p and p != pkg)])
    return env


def read(bundle: Path, name: str, limit: int) -> bytes | None:
    """A file of the bundle's trust root (manifest.json, its signature, signer.pub): the copy
    bootstrap.py checked where there is one, else read once from the bundle. None if missing."""
    d = folder()
    return read_or_none((d / name) if d is not None else bundle / name, limit)  # not found by bootstrap: missing


def read_or_none(path: Path, limit: int) -> bytes | None:
    """A small file's bytes through one descriptor that follows no link; None if it is missing."""
    try:
        return policy.read_once(path, limit)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BundlerError(f"{path}: cannot be read ({e.strerror})", hint="copy the bundle again from its source")


def manifest(bundle: Path) -> tuple[dict, bytes]:
    """The manifest as bootstrap.py checked it (or as read once here), parsed, with its bytes."""
    import json

    data = read(bundle, "manifest.json", policy.MAX_MANIFEST)
    if data is None:
        raise BundlerError(f"{bundle / 'manifest.json'}: no manifest here", hint="run this from an unpacked bundle")
    try:
        doc = json.loads(data)
        name = doc["name"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundlerError(f"{bundle / 'manifest.json'}: damaged manifest ({e})",
                           hint="copy the bundle again from its source")
    if not isinstance(name, str) or not policy.NAME_RE.match(name):
        raise BundlerError(f"{bundle / 'manifest.json'} names the bundle {name!r}, which is not a plain name; nothing "
                           "was changed", hint="copy the bundle again from its source")
    from ..contract.bundle import BundleDoc, ContractError

    try:
        BundleDoc.from_json(doc)  # the whole document, before anything reads a key of it
    except ContractError as e:
        raise BundlerError(f"{bundle / 'manifest.json'}: {e}; nothing was changed",
                           hint="install it with the airgap-llm version that made it (its manifest says which: "
                                f"{doc.get('airgap_llm', 'unknown')}), or bundle it again with this one")
    return doc, data
