"""One line naming the machine a benchmark ran on, so every reported number says where."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _first(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def describe_machine() -> str:
    """CPU model, cores, memory, load, GPU and the versions of the libraries we time."""
    cpu = _first("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    mem_kb = _first("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / 2**20:.0f} GiB RAM" if mem_kb else "RAM unknown"
    load = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    libs = []
    for name in ("torch", "monai", "pytorch-lightning", "antspyx"):
        try:
            libs.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem}, {load}; GPU: {gpu}; {', '.join(libs)}; "
        f"Python {platform.python_version()}"
    )
