"""Stand-in for `modules.fifo_lock`: a non-reentrant lock handed to waiters in arrival order."""

import collections
import threading


class FIFOLock:
    def __init__(self):
        self._guard = threading.Lock()
        self._held = False
        self._waiters = collections.deque()

    def acquire(self, blocking=True):
        with self._guard:
            if not self._held and not self._waiters:
                self._held = True
                return True
            if not blocking:
                return False
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # release() hands the lock over by setting our event
        return True

    def release(self):
        with self._guard:
            if self._waiters:
                self._waiters.popleft().set()  # stays held, now by the next waiter
            else:
                self._held = False

    def locked(self):
        return self._held

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
