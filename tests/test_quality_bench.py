"""Textual inversion teaches the tiny world's held-out green triangle: the quick form of bench/quality.py.

What is asserted is the bench's last line: the held-out pair (shape and colour together) is drawn
far more often after training than before (in the quick form's 300 steps, 0% -> 92% when this was
written; see README, "The tiny world"), and unrelated prompts are left as they were.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
LAST_LINE = re.compile(r"^quality (\S+): target before (\d+)% after (\d+)%; unrelated before (\d+)% after (\d+)%$")
MARGIN = 50  # percentage points over the untrained baseline


@pytest.mark.slow
def test_textual_inversion_draws_the_held_out_concept_far_more_often_than_before(tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--method", "embedding", "--quick", "--threads", "1"]
    env = {"SDWT_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = LAST_LINE.match(done.stdout.strip().splitlines()[-1])
    assert found is not None, done.stdout
    method, before, after, unrelated_before, unrelated_after = found.groups()
    assert method == "embedding"
    assert int(before) <= 20, done.stdout
    assert abs(int(unrelated_after) - int(unrelated_before)) <= 10, done.stdout
    assert int(after) >= int(before) + MARGIN, done.stdout
