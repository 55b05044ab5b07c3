"""Where everything goes on the box, who may have written it, one install at a time, and what
the installer made (so that uninstall removes that and nothing else).

    PREFIX/NAME/releases/ID/   one release: engine, plan, launch and ctl scripts, systemd unit
    PREFIX/NAME/current        → releases/ID, switched only after the new release answered
    PREFIX/NAME/history        the order releases went live (for --rollback)
    PREFIX/NAME/run, log       process mode: pid file and log (systemd mode: journald)
    PREFIX/NAME/cache          kernels the engines compile on first start (process mode)
    PREFIX/models/SHA256/      models stored once by content, shared by the bundles
    PREFIX/engines/            vLLM's wheels installed once per lock, shared
    PREFIX/.install.lock       held while an install, rollback or uninstall runs
    PREFIX/.made.json          directories and accounts the installer created
    CONFIG/NAME.env            the API key (0600), read by systemd or the supervisor, never executed
    CONFIG/trusted.d/          pinned signing keys;  CONFIG/accepted.json  versions accepted
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..contract import trust as policy
from ..errors import BundlerError
from .options import DEFAULT_PREFIX, Options

CONFIG_ROOT = Path(policy.CONFIG_ROOT)
UNIT_DIR = Path("/etc/systemd/system")


@dataclass(frozen=True)
class Layout:
    prefix: Path
    etc: Path
    name: str

    @property
    def home(self) -> Path:
        return self.prefix / self.name

    @property
    def releases(self) -> Path:
        return self.home / "releases"

    @property
    def current(self) -> Path:
        return self.home / "current"

    @property
    def history_file(self) -> Path:
        return self.home / "history"

    @property
    def models(self) -> Path:
        return self.prefix / "models"

    @property
    def engines(self) -> Path:
        return self.prefix / "engines"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def env_file(self) -> Path:
        return self.etc / f"{self.name}.env"

    @property
    def trusted(self) -> Path:
        return self.etc / "trusted.d"

    @property
    def accepted(self) -> Path:
        return self.etc / "accepted.json"

    @property
    def pidfile(self) -> Path:
        return self.home / "run" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.home / "log" / f"{self.name}.log"

    @property
    def unit(self) -> str:
        return f"airgap-llm-{self.name}.service"

    @property
    def unit_file(self) -> Path:
        return UNIT_DIR / self.unit

    @property
    def made_file(self) -> Path:
        return self.prefix / ".made.json"

    def log_hint(self, mode: str) -> str:
        return f"journalctl -u {self.unit}" if mode == "systemd" else str(self.logfile)


def layout_for(opts: Options, name: str) -> Layout:
    root = os.geteuid() == 0
    if opts.prefix:
        prefix = opts.prefix
    elif root:
        prefix = Path(DEFAULT_PREFIX)
    else:
        raise BundlerError(f"installing under {DEFAULT_PREFIX} needs root",
                           hint="run `sudo ./install.sh`, or `./install.sh --prefix $HOME/airgap-llm`")
    # derived where bootstrap.py derives it, by the one function both run (it found the pinned keys there)
    etc = Path(policy.config_dir(str(prefix) if opts.prefix else "", opts.config_dir or "", os.geteuid()))
    return Layout(prefix, etc, name)


# ---- who may have written it -------------------------------------------------------

def check_not_writable_by_others(path: Path, what: str) -> None:
    """Refuse to trust `path` (and the directories above it) if anyone but us or root could have
    written it: root installing into a folder another user made would run that user's code. The one
    test is the trust policy's (owners, mode bits, groups with other members, ACLs), as bootstrap.py
    runs it on the bundle."""
    p = path
    while not os.path.lexists(p) and p.parent != p:  # what does not exist yet is made by us: its parents count
        p = p.parent
    why = policy.writable_by_others(p, os.geteuid())
    if why:
        fix = (f"chown {os.geteuid()} {p}, chmod go-w {p} (and remove any ACL: setfacl -b {p})" if "symbolic link"
               not in why else f"remove the link {p}, or pass a real directory")
        where = f"{p} ({what})" + (f" above {path}" if p != path else "")
        rest = why[len(str(p)):].strip() if why.startswith(str(p)) else why
        raise BundlerError(f"{where} {rest}; refusing to trust what others could have planted there; nothing was "
                           "changed", hint=f"{fix}, or install into another --prefix")


def check_writable(path: Path, what: str) -> None:
    """`path` is a folder we can make or write into: its first existing part is a folder we may
    write (a file given as --prefix, or a read-only file system, failed with a traceback mid-install
    after --dry-run had approved it)."""
    p = path
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise BundlerError(f"{what} {path}: {p} is a file, not a folder; nothing was changed",
                           hint="give a folder (it is made if missing), e.g. --prefix $HOME/airgap-llm")
    if not os.access(p, os.W_OK | os.X_OK):
        raise BundlerError(f"{what} {path}: {p} cannot be written here (a read-only file system, or not this "
                           "user's); nothing was changed", hint="choose another --prefix, or run as a user who may "
                           "write there")


def check_layout_owned(layout: Layout) -> None:
    """Everything an install would trust or run: the prefix, this bundle's folder, the config
    folder, the env file, the pinned keys and the record of accepted versions."""
    check_not_writable_by_others(layout.prefix, "the install prefix")
    check_not_writable_by_others(layout.etc, "the config folder")
    for p, what in ((layout.home, "this bundle's folder"), (layout.env_file, "the env file"),
                    (layout.trusted, "the pinned keys"), (layout.accepted, "the accepted versions"),
                    (layout.made_file, "the install record"), (layout.models, "the model store"),
                    (layout.engines, "the engine store")):
        if p.exists() or p.is_symlink():
            check_not_writable_by_others(p, what)
    if layout.trusted.is_dir():
        for key in layout.trusted.iterdir():
            check_not_writable_by_others(key, "a pinned key")


# ---- one install at a time ----------------------------------------------------------

class PrefixLock:
    """An exclusive lock on PREFIX/.install.lock for the whole install, rollback or uninstall.
    A second installer refuses at once and names the first (its pid and command)."""

    def __init__(self, prefix: Path):
        self.path = prefix / ".install.lock"
        self.fd: int | None = None

    def __enter__(self) -> PrefixLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise BundlerError(f"another install is running in {self.path.parent} ({holder}); nothing was changed",
                               hint="wait for it to finish, then run this again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}: install.sh\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the lock
            self.fd = None


# ---- what the installer made --------------------------------------------------------

def made(layout: Layout) -> dict[str, list[str]]:
    try:
        d = json.loads(layout.made_file.read_text())
        return {"dirs": list(d.get("dirs", [])), "users": list(d.get("users", []))}
    except (FileNotFoundError, ValueError):
        return {"dirs": [], "users": []}


def record_made(layout: Layout, dirs: list[Path] = (), users: list[str] = ()) -> None:
    d = made(layout)
    for p in dirs:
        if str(p) not in d["dirs"]:
            d["dirs"].append(str(p))
    for u in users:
        if u not in d["users"]:
            d["users"].append(u)
    from ..files import atomic_write

    atomic_write(layout.made_file, (json.dumps(d, indent=2) + "\n").encode())


def make_dirs(path: Path, mode: int = 0o755) -> list[Path]:
    """mkdir -p that returns the directories it created (outermost first), each with `mode`."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:  # another process made it meanwhile: not ours
            continue
        os.chmod(d, mode)  # mkdir's mode is masked by the umask
        made.append(d)
    return made


def installed_bundles(prefix: Path) -> list[str]:
    """Names of the bundles installed in a prefix (folders with a current release)."""
    try:
        return sorted(d.name for d in prefix.iterdir() if (d / "current").is_symlink())
    except FileNotFoundError:
        return []
