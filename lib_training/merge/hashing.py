"""File hashes as A1111 records them: the sha256 of the whole file, and the old 8-digit "model hash".

Hashing a 7 GB checkpoint takes seconds, so results are kept per process (by path, size and
modification time), and `HashJob` hashes files on a background thread while a merge runs.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from lib_training.merge.progress import CancelToken, is_cancelled

_BLOCK = 8 * 1024 * 1024
_cache: dict[tuple[str, int, int], str] = {}
_cache_lock = threading.Lock()


def _cache_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def file_sha256(path: str | os.PathLike[str], cancel: CancelToken = None) -> str | None:
    """Hex sha256 of the whole file (cached per process); None if cancelled before it was done."""
    path = Path(path)
    key = _cache_key(path)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    digest = hashlib.sha256()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while True:
            if is_cancelled(cancel):
                return None
            count = f.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    value = digest.hexdigest()
    with _cache_lock:
        _cache[key] = value
    return value


def remember_sha256(path: str | os.PathLike[str], value: str) -> None:
    """Record a file's sha256 known from elsewhere (a host's hash cache), so it is not recomputed."""
    with _cache_lock:
        _cache[_cache_key(Path(path))] = value


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111's old "model hash": sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class HashJob:
    """sha256 of several files, computed on a background thread; `result()` waits for them."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]], cancel: CancelToken = None) -> None:
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self._stop = threading.Event()
        self._cancel = cancel
        self._results: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _stopped(self) -> bool:
        return self._stop.is_set() or is_cancelled(self._cancel)

    def _run(self) -> None:
        try:
            for path in self.paths:
                value = file_sha256(path, self._stopped)
                if value is None:
                    return
                self._results[path] = value
        except BaseException as error:  # handed to the caller of result()
            self._error = error

    def result(self) -> Mapping[Path, str]:
        """Path -> hex sha256 of every file; raises what hashing raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._results)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
