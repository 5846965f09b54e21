"""What the machine has room for: memory available to allocate now, and sizes as a person reads them."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory", "human_size", "usable_cores"]


def available_memory() -> int | None:
    """Bytes of memory available to allocate now: Linux ``MemAvailable``, or less under a cgroup (v2) limit; None
    where unknown."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def human_size(n: float) -> str:
    """Bytes as a person reads them: ``512 bytes``, ``3.2 MiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
