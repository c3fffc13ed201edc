"""Peak memory of a run, for the run log: torch's peak allocation on CUDA, the peak resident set on the CPU."""

from __future__ import annotations

import sys

import torch

MIB = 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak (the CPU's peak resident set cannot be reset portably: it covers the process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """{"peak_memory_mib": ..., "peak_memory_of": what was measured}."""
    if device.type == "cuda":
        return {
            "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / MIB, 1),
            "peak_memory_of": "torch.cuda.max_memory_allocated since the run began",
        }
    try:
        import resource
    except ImportError:  # not on POSIX
        return {"peak_memory_mib": float("nan"), "peak_memory_of": "unavailable on this platform"}
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = maxrss / MIB if sys.platform == "darwin" else maxrss / 1024
    return {"peak_memory_mib": round(mib, 1), "peak_memory_of": "the process's peak resident set (ru_maxrss)"}
