"""Each training method teaches the tiny world's held-out green triangle: the quick form of bench/quality.py.

What is asserted is the bench's last line: the held-out pair (shape and colour together) is drawn
far more often after training than before, and unrelated prompts are not drawn worse (within 10
points; textual inversion, which changes nothing but its own word, leaves them as they were). Each
method trains with the bench's recipe for it (`RECIPES`); the figures when this was written are in
README, "The tiny world".
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
KEPT = 10  # percentage points unrelated prompts may lose


def quick_quality(method: str, cache: Path) -> tuple[str, int, int, int, int]:
    """(output, target before, after, unrelated before, after) of `bench/quality.py --quick`."""
    argv = [sys.executable, str(SCRIPT), "--method", method, "--quick", "--threads", "1"]
    env = {"SDWT_CACHE": str(cache), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = LAST_LINE.match(done.stdout.strip().splitlines()[-1])
    assert found is not None, done.stdout
    assert found.group(1) == method
    before, after, unrelated_before, unrelated_after = (int(value) for value in found.groups()[1:])
    return done.stdout, before, after, unrelated_before, unrelated_after


@pytest.mark.slow
def test_textual_inversion_draws_the_held_out_concept_far_more_often_than_before(tmp_path: Path) -> None:
    out, before, after, unrelated_before, unrelated_after = quick_quality("embedding", tmp_path)
    assert before <= 20, out
    assert abs(unrelated_after - unrelated_before) <= KEPT, out
    assert after >= before + MARGIN, out


@pytest.mark.slow
def test_lora_draws_the_held_out_concept_far_more_often_than_before(tmp_path: Path) -> None:
    out, before, after, unrelated_before, unrelated_after = quick_quality("lora", tmp_path)
    assert before <= 20, out
    assert unrelated_after >= unrelated_before - KEPT, out
    assert after >= before + MARGIN, out


@pytest.mark.slow
def test_a_hypernetwork_draws_the_held_out_concept_far_more_often_than_before(tmp_path: Path) -> None:
    out, before, after, unrelated_before, unrelated_after = quick_quality("hypernetwork", tmp_path)
    assert before <= 20, out
    assert unrelated_after >= unrelated_before - KEPT, out
    assert after >= before + MARGIN, out
