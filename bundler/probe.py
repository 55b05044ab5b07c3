"""Facts about the box: CPU, RAM, disk, GPUs, OS, glibc, Python, systemd.

Standard library only (it runs before anything is installed). GPUs come from
`nvidia-smi --query-gpu … --format=csv` when it is on PATH.
"""

from __future__ import annotations

import csv
import io
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        d = dict(d)
        d["gpus"] = tuple(Gpu(**g) for g in d.get("gpus", ()))
        d["cpu_flags"] = tuple(d.get("cpu_flags", ()))
        return cls(**d)


def parse_gpu_csv(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`."""
    gpus = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 6 or not row[0].strip().isdigit():
            continue
        idx, name, total, free, cc, driver = (c.strip() for c in row[:6])
        gpus.append(Gpu(int(idx), name, int(float(total)), int(float(free)), cc, driver))
    return gpus


def _gpus() -> tuple[Gpu, ...]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run([smi, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(parse_gpu_csv(out))


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
                return tuple(sorted(line.split(":", 1)[1].split()))
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


def probe(prefix: Path) -> Hardware:
    mem = _meminfo()
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
        gpus=_gpus(),
    )


if __name__ == "__main__":  # pragma: no cover
    import json

    json.dump(probe(Path(sys.argv[1] if len(sys.argv) > 1 else "/")).to_dict(), sys.stdout, indent=2)
