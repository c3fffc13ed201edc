"""Small measuring helpers shared by the benchmarks: this process's resident memory and its peak.

The peak resident set (VmHWM) can be reset to the current resident set, so a benchmark can measure
the peak of just its timed steps. Children should run with `child_env()`, which sends large
allocations through mmap so that freed memory leaves the resident set at once (glibc otherwise
keeps freed blocks, and a later peak would not show up as growth).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

MIB = 2**20


def rss_kib(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in KiB ("VmRSS": now, "VmHWM": peak); 0 where unavailable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux 4.0+; silently nothing elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child_env() -> dict[str, str]:
    """The environment for a measured child process: large allocations through mmap."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
