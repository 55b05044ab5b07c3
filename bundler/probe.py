"""Facts about the box: CPU, RAM, disk, GPUs, OS, glibc, Python, systemd.

Standard library only (it runs before anything is installed). GPUs come from
`nvidia-smi --query-gpu … --format=csv` when it is on PATH.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GPU_QUERY = "index,name,memory.total,memory.free,compute_cap,driver_version"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mib: int
    memory_free_mib: int
    compute_capability: str
    driver: str


@dataclass(frozen=True)
class Hardware:
    cpus: int
    ram_total: int
    ram_available: int
    disk_free: int
    disk_path: str
    arch: str
    cpu_flags: tuple[str, ...]
    glibc: str
    python: str
    os: str
    systemd_pid1: bool
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)
    gpu_links: str = ""  # "nvlink" (every pair), "pcie", or "" (fewer than two GPUs)
    gpu_source: str = ""  # "nvml", "nvidia-smi", or "" (none found)
    python_path: str = ""  # the python3 that ran the probe (the installer's)
    site_packages: tuple[str, ...] = ()
    # distributions that python already has (name → version), for bundles that reuse them
    installed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        """From a probe file's JSON; a field of the wrong type is a TypeError naming it (it was a
        traceback deep in the planner)."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        gpus = d.get("gpus", ())
        if not isinstance(gpus, (list, tuple)) or not all(isinstance(g, dict) for g in gpus):
            raise TypeError(f"field gpus must be a list of objects, got {gpus!r:.80}")
        d["gpus"] = tuple(_typed(Gpu, g, f"gpus[{i}].") for i, g in enumerate(gpus))
        for key in ("cpu_flags", "site_packages"):
            d[key] = tuple(d.get(key, ())) if isinstance(d.get(key, ()), (list, tuple)) else d[key]
        return _typed(cls, d)


_CHECK = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "bool": lambda v: isinstance(v, bool),
          "tuple[str, ...]": lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
          "dict[str, str]": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())}


def _typed(cls: Any, d: dict[str, Any], where: str = "") -> Any:
    """cls(**d) for the fields cls knows, each of the type it declares (the others pass as given)."""
    import dataclasses

    known = {f.name: f for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in d.items() if k in known}
    for k, v in kept.items():
        check = _CHECK.get(str(known[k].type))
        if check is not None and not check(v):
            raise TypeError(f"field {where}{k} must be {known[k].type}, got {v!r:.80}")
    missing = [k for k, f in known.items() if k not in kept and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TypeError(f"fields missing: {', '.join(where + k for k in missing)}")
    return cls(**kept)


def load_probe(path: str, option: str) -> Hardware:
    """A probe file (./install.sh --probe, bundler probe) given as `option`."""
    import json

    from .errors import BundlerError

    try:
        return Hardware.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise BundlerError(f"{option} {path}: not a probe file ({e})",
                           hint="make it on the box with ./install.sh --probe > box.json (or bundler probe)")


def parse_gpu_csv(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=… --format=csv` output, with or without its header
    (`noheader,nounits` output is read in GPU_QUERY's column order)."""
    rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text)) if row]
    if not rows:
        return []
    columns = GPU_QUERY.split(",")
    if not rows[0][0].isdigit():  # a header: "index, uuid, name, memory.total [MiB], …"
        columns = [c.split(" [")[0].strip() for c in rows[0]]
        rows = rows[1:]
    gpus = []
    for row in rows:
        d = dict(zip(columns, row))
        if not d.get("index", "").isdigit():
            continue
        gpus.append(Gpu(int(d["index"]), d.get("name", "?"), _num(d, "memory.total"), _num(d, "memory.free"),
                        d.get("compute_cap", "0.0"), d.get("driver_version", "")))
    return gpus


def _num(d: dict[str, str], key: str) -> int:
    try:
        return int(float(d.get(key, "0").split()[0]))
    except (ValueError, IndexError):  # "[N/A]" on some boards
        return 0


def parse_topo(text: str) -> str:
    """'nvlink' when every GPU pair in `nvidia-smi topo -m` is linked by NVLink (NV#),
    'pcie' when some pair is not, '' for fewer than two GPUs."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # nvidia-smi underlines the header on a terminal
    lines = [line.split("\t") for line in text.splitlines() if line.startswith("GPU")]
    header = next((row for row in (line.split("\t") for line in text.splitlines()) if "GPU0" in row[1:2]), None)
    n = sum(1 for c in (header or []) if c.strip().startswith("GPU") and c.strip()[3:].isdigit())
    if n < 2:
        return ""
    links = []
    for row in lines[:n]:
        cells = [c.strip() for c in row[1:n + 1]]
        links += [c for c in cells if c and c != "X"]
    return "nvlink" if links and all(c.startswith("NV") for c in links) else "pcie"


def _smi(*args: str) -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ""
    try:
        return subprocess.run([smi, *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _gpus_nvml() -> tuple[tuple[Gpu, ...], str] | None:
    """GPUs and links through NVML (nvidia-ml-py, pure Python over the driver's libnvidia-ml);
    None when NVML cannot be loaded, so nvidia-smi is asked instead."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # no module, no driver library, no GPU: all mean "ask nvidia-smi"
        return None
    try:
        def text(v):
            return v.decode() if isinstance(v, bytes) else str(v)

        driver = text(pynvml.nvmlSystemGetDriverVersion())
        gpus, linked = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(Gpu(i, text(pynvml.nvmlDeviceGetName(h)), int(mem.total) >> 20, int(mem.free) >> 20,
                            f"{major}.{minor}", driver))
            active = 0
            for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    active += int(pynvml.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED)
                except Exception:
                    break
            linked.append(active > 0)
        links = ("nvlink" if all(linked) else "pcie") if len(gpus) > 1 else ""
        return tuple(gpus), links
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpus() -> tuple[Gpu, ...]:
    return tuple(parse_gpu_csv(_smi(f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits")))


def _meminfo() -> dict[str, int]:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                info[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return info


def _cpu_flags() -> tuple[str, ...]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                # only the instruction sets that decide which engine builds run here
                return tuple(sorted(f for f in line.split(":", 1)[1].split()
                                    if f.startswith(("avx", "fma", "f16c", "sse4", "amx", "bmi"))))
    except OSError:
        pass
    return ()


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def systemd_is_pid1() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd" and Path("/run/systemd/system").is_dir()
    except OSError:
        return False


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def installed_distributions(paths: tuple[str, ...]) -> dict[str, str]:
    """Distributions installed in these site-packages (not the bundle's own wheels on PYTHONPATH), by the
    names of their NAME-VERSION.dist-info (or .egg-info) folders alone: the installer runs as root, and a
    METADATA file could be a FIFO (a hang), a link to any file (read as root) or not UTF-8 (a crash)."""
    import re

    found: dict[str, str | None] = {}  # the first folder that has a name decides, as import would
    for folder in paths:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        here: dict[str, set[str]] = {}
        for entry in names:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._]*?)-([0-9][^-]*?)(?:-py[0-9.]+)?\.(?:dist|egg)-info$", entry)
            if m:
                here.setdefault(m.group(1).lower().replace("_", "-").replace(".", "-"), set()).add(m.group(2))
        for name, versions in here.items():
            # two versions' folders in one place (an uninstall that stopped half-way): which files are on
            # disk is unknown, so it counts as absent; never reused, the bundle carries its own
            found.setdefault(name, versions.pop() if len(versions) == 1 else None)
    return dict(sorted((k, v) for k, v in found.items() if v is not None))


def _site_packages() -> tuple[str, ...]:
    """The site-packages of this python as it runs engines. The installer runs with -I -S (nothing of the
    bundle folder or the environment is imported before verification), and without site.py a venv's python
    (the GPU boxes' /opt/torch/.venv) reports the base install's folders: its torch went unseen. So the venv
    is found as site.py finds it (pyvenv.cfg beside the executable or one folder up), by reading that file
    and running nothing: site.py would run the venv's .pth files, as root here."""
    import site
    import sysconfig

    paths = [sysconfig.get_paths()["purelib"], *getattr(site, "getsitepackages", lambda: [])()]
    if sys.flags.no_site:
        exe_dir = os.path.dirname(os.path.abspath(sys.executable))
        venv = os.path.dirname(exe_dir)
        for conf in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(venv, "pyvenv.cfg")):
            try:
                with open(conf, encoding="utf-8", errors="replace") as f:
                    text = f.read(65536)
            except OSError:
                continue
            kv = dict((k.strip().lower(), v.strip().lower()) for k, v in
                      (line.split("=", 1) for line in text.splitlines() if "=" in line))
            system = kv.get("include-system-site-packages") == "true"
            prefixes = [venv, *([sys.base_prefix] if system else [])]
            paths = [*site.getsitepackages(prefixes), *(paths if system else [])]
            break
    return tuple(dict.fromkeys(p for p in paths if isinstance(p, str) and os.path.isdir(p)))


def probe(prefix: Path) -> Hardware:
    mem = _meminfo()
    nvml = _gpus_nvml()
    if nvml is not None:
        gpus, links, source = nvml[0], nvml[1], "nvml"
    else:
        gpus = _gpus()
        links = parse_topo(_smi("topo", "-m")) if len(gpus) > 1 else ""
        source = "nvidia-smi" if gpus else ""
    site = _site_packages()
    disk = _existing_parent(prefix)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count() or 1
    return Hardware(
        cpus=cpus,
        ram_total=mem.get("MemTotal", 0),
        ram_available=mem.get("MemAvailable", mem.get("MemFree", 0)),
        disk_free=shutil.disk_usage(disk).free,
        disk_path=str(disk),
        arch=platform.machine(),
        cpu_flags=_cpu_flags(),
        glibc=platform.libc_ver()[1] or "0",
        python=platform.python_version(),
        os=_os_name(),
        systemd_pid1=systemd_is_pid1(),
        gpus=gpus,
        gpu_links=links,
        gpu_source=source,
        python_path=sys.executable,
        site_packages=site,
        installed=installed_distributions(site),
    )


if __name__ == "__main__":  # pragma: no cover
    import json

    json.dump(probe(Path(sys.argv[1] if len(sys.argv) > 1 else "/")).to_dict(), sys.stdout, indent=2)
