"""This process's peak resident set size, measured so that a parent's size does not leak into it.

``getrusage(RUSAGE_SELF).ru_maxrss`` is the wrong number for a process started by another: Linux keeps the
largest resident set the process ever had, including the parent's address space copied at ``fork`` and dropped at
``exec``. A 500 MB script started from a 1.2 GB pytest process reports 1.2 GB. ``VmHWM`` in /proc/self/status
is the high-water mark of the current address space only, so it starts afresh at ``exec``.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

__all__ = ["peak_rss_mib"]


def peak_rss_mib() -> float:
    """Peak resident set size of this process's address space (MiB): VmHWM, or ru_maxrss where /proc is absent."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
