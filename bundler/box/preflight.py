"""Step 3: refuse a box that breaks what the bundle assumed (CPU, glibc, disk, Python, the
packages it reuses, the driver, the port), before anything changes."""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from .. import planner, probe
from .. import engines
from ..errors import BundlerError
from ..versions import version_tuple
from .layout import Layout


def preflight(doc: dict[str, Any], hw: probe.Hardware, layout: Layout) -> None:
    problems = []
    for e in doc["engines"]:
        if e["arch"] != hw.arch:
            problems.append(f"the bundled {e['name']} is built for {e['arch']}, this box is {hw.arch}")
        if version_tuple(hw.glibc) < version_tuple(e["glibc"]):
            problems.append(f"the bundled {e['name']} needs glibc >= {e['glibc']}, this box has {hw.glibc}; "
                            "bundle on a machine with an older glibc than the box's")
    need, wheel = wheels_glibc(doc, hw.python)
    if need and version_tuple(hw.glibc) < version_tuple(need):
        problems.append(f"the bundled wheel {wheel} needs glibc >= {need}, this box has {hw.glibc}; bundle against "
                        "this box's probe file (make bundle TARGET=box.json)")
    model_bytes = sum(f["size"] for f in doc["files"] if f["path"].startswith("models/"))
    other = sum(f["size"] for f in doc["files"]) - model_bytes
    existing = sum((layout.models / m["sha256"]).exists() for m in doc["models"])
    need_bytes = other * 2 + (0 if existing else model_bytes) + 64 * planner.MiB
    if hw.disk_free < need_bytes:
        problems.append(f"{hw.disk_path} has {hw.disk_free / 2**30:.2f} GiB free, the install needs "
                        f"{need_bytes / 2**30:.2f} GiB; free space there or pass --prefix on a larger disk")
    t = doc.get("target")
    if t:
        py = ".".join(hw.python.split(".")[:2])
        if t["python"] != py:
            problems.append(f"the bundle was made for Python {t['python']}, this installer runs on {py}; run it "
                            f"with AIRGAP_LLM_PYTHON={t.get('python_path') or 'python' + t['python']}")
        for name, version in sorted(t.get("installed", {}).items()):
            have = hw.installed.get(name)
            if have != version:
                problems.append(f"the bundle reuses {name} {version} from the box's python, which has "
                                f"{have or 'none'}; bundle again with this box's probe (./install.sh --probe)")
        if t.get("driver_min") and hw.gpus and version_tuple(hw.gpus[0].driver) < version_tuple(t["driver_min"]):
            problems.append(f"the bundled CUDA 13 engines need NVIDIA driver >= {t['driver_min']}, this box has "
                            f"{hw.gpus[0].driver}; update the driver")
    if problems:
        raise BundlerError("this box does not meet the bundle's needs:\n  " + "\n  ".join(problems),
                           hint="nothing was changed")


def wheels_glibc(doc: dict[str, Any], python: str) -> tuple[str, str]:
    """The newest glibc any bundled wheel for this Python needs (a wheel with several tags
    needs the oldest of them), and that wheel's name."""
    from ..contract.locks import WHEEL_RE

    tag = "cp" + "".join(python.split(".")[:2])
    worst, name = (0, 0), ""
    for f in doc["files"]:
        base = f["path"].rsplit("/", 1)[-1]
        w = WHEEL_RE.match(base)
        if not w:
            continue
        if not (w["py"].startswith("py") or w["py"] == tag or w["abi"] == "abi3"):
            continue  # a wheel for another Python (markupsafe is carried for each)
        needs = []
        for t in w["plat"].split("."):
            m = re.match(r"manylinux_(\d+)_(\d+)_", t)
            if m:
                needs.append((int(m.group(1)), int(m.group(2))))
            elif t.startswith("manylinux2014"):
                needs.append((2, 17))
            elif t.startswith("manylinux2010"):
                needs.append((2, 12))
            elif t.startswith("manylinux1"):
                needs.append((2, 5))
        if needs and min(needs) > worst:
            worst, name = min(needs), base
    return (f"{worst[0]}.{worst[1]}" if name else ""), name


def check_port(host: str, port: int, ours_running: bool, option: str = "--port", other: int | None = None) -> None:
    """Refuse a port another program holds (ours is stopped and restarted by the upgrade). `option` and
    `other` make the hint: the option that moves the port, and a value to suggest (default port + 1)."""
    if ours_running:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise BundlerError(f"--host {host}: not an address this box can resolve without a network ({e.strerror}); "
                               "nothing was changed", hint="give an IP address of this box, 127.0.0.1, or 0.0.0.0")
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise BundlerError(f"--host {host}: this box has no such address ({e.strerror}); nothing was changed",
                                   hint="give one of its own addresses (ip -brief addr), 127.0.0.1, or 0.0.0.0")
            from .listener import holder

            who = holder(port)
            raise BundlerError(f"port {port} on {host} is taken by another program ({e.strerror}"
                               f"{': ' + who if who else ''}); nothing was changed",
                               hint=f"free it, or pick another with {option} (e.g. {option} {other or port + 1})")


# the engines whose kernels are Triton's, by name → label
TRITON_ENGINES = {e.name: e.label for e in engines.registry().values() if e.triton}


def triton_toolchain(doc: dict[str, Any], name: str, say: bool = True) -> dict[str, str]:
    """What Triton (the kernels of engine `name`: vLLM, ExLlamaV3) compiles its launchers with on this
    box: {"cc": the box's compiler or "" for the bundle's Zig, "headers": "" for the box's Python.h or
    the bundle's folder of them}. A box with neither refuses here, naming what to install, not at the
    engine's first request."""
    import shutil
    import sysconfig

    e = next((e for e in doc["engines"] if e["name"] == name), None)
    if e is None:
        return {}
    label = TRITON_ENGINES[name]
    cc = next((p for p in (shutil.which(c) for c in ("cc", "gcc", "clang")) if p), "")
    scheme = sysconfig.get_default_scheme()
    inc = Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])
    zig = any(f["path"].startswith(f"{e['dir']}/wheels/ziglang-") for f in doc["files"])
    bundled_h = e.get("python_headers") or ""
    py = ".".join(sys.version.split(".")[:2])
    problems = []
    if not cc and not zig:
        problems.append(f"no C compiler (cc, gcc, clang), which {label}'s Triton kernels need at start, and this "
                        f"bundle brings none: install gcc, or bundle again with this airgap-llm (its {label} bundles "
                        "bring Zig's C compiler)")
    if not (inc / "Python.h").is_file() and not bundled_h:
        problems.append(f"no Python.h for Python {py} (looked in {inc}), which Triton compiles its launchers against, "
                        f"and this bundle brings none: install python{py}-dev (libpython{py}-dev) on this box, or "
                        "bundle with engines.vllm.python_headers naming them (they serve every engine)")
    if problems:
        raise BundlerError(f"this box cannot run {label}'s kernels:\n  " + "\n  ".join(problems),
                           hint="nothing was changed")
    out = {"cc": cc, "headers": "" if (inc / "Python.h").is_file() else bundled_h}
    # FlashInfer's sampling kernels are compiled at the engine's first start with nvcc and a C++ compiler
    # (ninja exited 127 on a box without them, and the engine with it): without both, vLLM's own PyTorch
    # sampling instead
    nvcc = shutil.which("nvcc") or next((str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.is_file()), "")
    cxx = next((p for p in (shutil.which(c) for c in ("c++", "g++", "clang++")) if p), "")
    out["flashinfer_jit"] = "yes" if nvcc and cxx else ""
    if say:
        from .report import info

        where = f"{inc} (this box)" if not out["headers"] else f"from the bundle ({inc} has none)"
        info(f"Triton's C compiler: {cc + ' (this box)' if cc else 'Zig clang from the bundle (this box has none)'}; "
             f"Python headers: {where}")
        if not out["flashinfer_jit"] and engines.get(name).flashinfer:
            info(f"no {'nvcc' if not nvcc else 'C++ compiler'} on this box, which FlashInfer compiles its sampling "
                 "kernels with at the first start: vLLM samples with PyTorch instead (VLLM_USE_FLASHINFER_SAMPLER=0)")
    return out


def _first_closed_above(path: str) -> str:
    """The first folder above `path`, from / down, that the current user cannot enter ('' if none):
    the one to open (a deeper one is closed only because of it)."""
    above = [os.path.dirname(path)]
    while above[-1] != os.path.dirname(above[-1]):
        above.append(os.path.dirname(above[-1]))
    return next((d for d in reversed(above) if not os.access(d, os.X_OK)), "")


def _first_unreadable(root: str) -> str:
    """The first path of a model the current user cannot reach: '' when every one can be read."""
    closed = _first_closed_above(root)
    if closed:
        return f"{closed}: a folder above the model it cannot enter"
    todo = [root]
    while todo:
        p = todo.pop()
        if os.path.isdir(p):
            if not os.access(p, os.R_OK | os.X_OK):
                return f"{p}: a folder it cannot list"
            todo += [os.path.join(p, n) for n in sorted(os.listdir(p))]
        elif not os.access(p, os.R_OK):
            return f"{p}: a file it cannot read"
    return ""


def _as_user(uid: int, gid: int, groups: list[int], fn, *args) -> str:
    """fn(*args) in a forked child that runs as uid/gid (no exec: the box's python may be one that
    account cannot start); its string result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the account, answer, and leave without running anything else
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, fn(*args).encode("utf-8", "replace")[:4000])
        except BaseException as e:  # noqa: BLE001 - anything goes back as text, nothing escapes the child
            try:
                os.write(w, f"cannot check as uid {uid}: {e}".encode()[:4000])
            except OSError:
                pass
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while True:
        block = os.read(r, 4096)
        if not block:
            break
        out += block
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode("utf-8", "replace")


def _first_unrunnable(exe: str) -> str:
    """Why the current user cannot start the program `exe` (through any link to it): '' when it can."""
    for p in dict.fromkeys([exe, os.path.realpath(exe)]):
        closed = _first_closed_above(p)
        if closed:
            return f"{closed}: a folder above {p} it cannot enter"
        if not os.access(p, os.X_OK):
            return f"{p}: a program it may not run"
    return ""


def _engine_account(user: str, mode: str) -> tuple[int, int, list[int]] | None:
    """uid, gid and groups of the account the engine runs as, when that is not the installing user."""
    import pwd

    if os.geteuid() != 0 or not (user or mode == "systemd"):
        return None  # the engine runs as the installing user
    try:
        pw = pwd.getpwnam(user) if user else None
    except KeyError:
        pw = None  # made at install: a new system account, with no group of the model's
    return ((pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)) if pw else (65534, 65534, []))


def _who(user: str) -> str:
    return f"the account {user}" if user else "the service's own account (systemd DynamicUser)"


def check_runnable_by_engine(exe: str, user: str, mode: str) -> None:
    """A Python engine runs on the installer's python, as the engine's account: that account must be
    able to start it (a python under /root, as pyenv installs one, failed at start with 'Permission denied')."""
    account = _engine_account(user, mode)
    why = _as_user(*account, _first_unrunnable, exe) if account else ""
    if why:
        raise BundlerError(f"the engine runs as {_who(user)} on this installer's python {exe}, which that account "
                           f"cannot start: {why}; nothing was changed",
                           hint="run install.sh with a python3 every account may run, e.g. "
                                "AIRGAP_LLM_PYTHON=/usr/bin/python3 ./install.sh")


def check_readable_by_engine(path: Path, user: str, mode: str) -> None:
    """The engine runs as another account: every file and folder of a model on the box must be
    readable by it, checked before anything changes (a root-owned 0600 safetensors shard, as torch's
    writer makes them, made vLLM fail after 80 s with "file not found"). Under systemd the engine's
    account is made at each start (DynamicUser=): it reads what any other user may."""
    account = _engine_account(user, mode)
    why = _as_user(*account, _first_unreadable, str(path)) if account else ""
    if why:
        who = _who(user)
        raise BundlerError(f"the engine runs as {who} and cannot read the model: {why}; nothing was changed",
                           hint=f"let it read the model: chmod -R a+rX {path} (and a+x on the folders above it), "
                                f"or copy the model where it can")
