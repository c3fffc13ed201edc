"""Progress reports of a running job: step, speed, ETA, loss, latest preview."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Progress:
    phase: str  # "preparing", "caching latents", "caching text", "training", "previewing", "saving", "done"
    step: int
    total: int
    loss: float | None = None
    lr: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    preview: Path | None = None  # the newest preview image, if any
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def describe(self) -> str:
        if not self.total:  # nothing counted yet (waiting, preparing): the phase and what it is about
            return f"{self.phase}: {self.message}" if self.message else self.phase
        parts = [f"{self.phase} {self.step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.steps_per_second:
            parts.append(f"{self.steps_per_second:.2f} it/s")
        if self.eta_seconds is not None and self.step < self.total:  # nothing left: no "ETA 0:00"
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RateMeter:
    """Steps per second over the last `window` steps, and the time left at that rate."""

    def __init__(self, window: int = 20, clock=time.perf_counter) -> None:
        self._clock = clock
        self._marks: deque[tuple[int, float]] = deque(maxlen=window + 1)

    def mark(self, step: int) -> None:
        self._marks.append((step, self._clock()))

    def rate(self) -> float | None:
        if len(self._marks) < 2:
            return None
        (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def eta(self, remaining_steps: int) -> float | None:
        rate = self.rate()
        return remaining_steps / rate if rate else None
