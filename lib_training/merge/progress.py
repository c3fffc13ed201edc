"""Progress reports with an ETA, and cancellation, for long file operations (merges, LoRA bakes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lib_training.errors import UserError

# A cancel request: an Event that gets set, or a function that answers True once cancelled.
CancelToken = threading.Event | Callable[[], bool] | None


class CancelledError(UserError):
    """The operation was cancelled; nothing was written."""


def is_cancelled(cancel: CancelToken) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def check_cancel(cancel: CancelToken, what: str) -> None:
    """Raise CancelledError if a cancel was requested."""
    if is_cancelled(cancel):
        raise CancelledError(f"{what} was cancelled; no file was written")


@dataclass(frozen=True)
class WriteProgress:
    """Where a streaming operation stands. Bytes count the output written so far."""

    done_bytes: int
    total_bytes: int
    done_tensors: int
    total_tensors: int
    elapsed: float  # seconds since the start
    eta: float | None  # seconds left, estimated from the rate so far (None until there is a rate)
    key: str  # the tensor being produced

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


ProgressCallback = Callable[[WriteProgress], None]


class ProgressMeter:
    """Counts produced bytes and tensors and reports them, at most every `interval` seconds."""

    def __init__(
        self,
        total_bytes: int,
        total_tensors: int,
        callback: ProgressCallback | None,
        interval: float = 0.2,
    ) -> None:
        self.total_bytes = total_bytes
        self.total_tensors = total_tensors
        self.callback = callback
        self.interval = interval
        self.start = time.perf_counter()
        self.done_bytes = 0
        self.done_tensors = 0
        self._last = float("-inf")

    def advance(self, key: str, nbytes: int = 0, tensors: int = 0) -> None:
        self.done_bytes += nbytes
        self.done_tensors += tensors
        if self.callback is None:
            return
        now = time.perf_counter()
        finished = self.done_tensors >= self.total_tensors
        if now - self._last < self.interval and not finished:
            return
        self._last = now
        elapsed = now - self.start
        eta = None
        if self.done_bytes and elapsed > 0:
            eta = (self.total_bytes - self.done_bytes) * elapsed / self.done_bytes
        self.callback(
            WriteProgress(self.done_bytes, self.total_bytes, self.done_tensors, self.total_tensors, elapsed, eta, key)
        )
