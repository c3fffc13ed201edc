"""The hypernetwork benchmark runs end to end on the tiny SD1, compares like with like, and takes
its rounds in turns."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_hypernetwork.py"
SPEED = re.compile(r"by CPU time \(one thread\): (\S+)x .* slowest round (\S+)x\), wall time (\S+)x")
LOSS = re.compile(r"step-1 loss: ours (\S+), reference (\S+) \(relative difference (\S+)\)")
GENERATION = re.compile(r"by CPU time \(one thread\): ([-+]\S+)% \(target < 5%\)")
RUN = re.compile(r"\(sd1 (ours|reference): ")


@pytest.mark.slow
def test_benchmark_alternates_rounds_and_prints_speed_loss_and_generation() -> None:
    argv = [sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--warmup", "1", "--rounds", "2", "--threads", "1"]
    argv += ["--images", "1", "--gen-steps", "1", "--gen-repeats", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    assert RUN.findall(done.stdout) == ["ours", "reference", "reference", "ours"]
    speed = SPEED.search(done.stdout)
    assert speed is not None, done.stdout
    assert all(math.isfinite(float(value)) and float(value) > 0 for value in speed.groups())
    assert float(speed.group(2)) <= float(speed.group(1))  # ours' slowest round is no faster than its quietest
    losses = LOSS.search(done.stdout)
    assert losses is not None and float(losses.group(3)) < 1e-5, done.stdout  # same weights and batch
    assert GENERATION.search(done.stdout) is not None, done.stdout
