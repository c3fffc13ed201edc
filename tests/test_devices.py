"""Memory a finished job freed goes back to the system."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_training.devices import _glibc, give_back_freed_memory


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(_glibc() is None, reason="trims glibc's heap (Linux with glibc)")
def test_memory_freed_on_the_cpu_is_returned_to_the_system() -> None:
    """Many small tensors (as activations are) live on the C heap; freed among a few survivors,
    glibc keeps their pages until it is asked to trim."""
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 64 KiB each, 256 MiB in all
    survivors = blocks[::512]
    del blocks
    held = _rss_mib()

    give_back_freed_memory()

    assert held - _rss_mib() > 128
    assert all(block.sum().item() == 16 * 1024 for block in survivors)
