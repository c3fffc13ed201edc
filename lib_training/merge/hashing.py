"""File hashes as A1111 records them: the sha256 of the whole file, and the old 8-digit "model hash".

Hashing a 7 GB checkpoint takes seconds, so results are kept (by path, size and modification time)
in memory and in `hashes.json` in the user cache folder, as A1111 keeps its own; `HashJob` hashes
files on a background thread while a merge runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from lib_training.atomic import write_text
from lib_training.merge.progress import CancelToken, is_cancelled
from lib_training.user_cache import cache_root

_BLOCK = 8 * 1024 * 1024
_cache: dict[tuple[str, int, int], str] = {}
_cache_lock = threading.Lock()
_loaded_from_disk = False
CACHE_FILE = "hashes.json"


def _cache_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _disk_cache() -> Path:
    return cache_root() / CACHE_FILE


def _load_disk_cache() -> None:
    """Merge the on-disk cache into memory once (a missing or damaged file is ignored)."""
    global _loaded_from_disk
    if _loaded_from_disk:
        return
    _loaded_from_disk = True
    try:
        entries = json.loads(_disk_cache().read_text())
        for entry in entries:
            _cache[(str(entry["path"]), int(entry["size"]), int(entry["mtime_ns"]))] = str(entry["sha256"])
    except (OSError, ValueError, TypeError, KeyError):
        pass


def _save_disk_cache() -> None:
    entries = [
        {"path": p, "size": size, "mtime_ns": mtime, "sha256": value} for (p, size, mtime), value in _cache.items()
    ]
    with contextlib.suppress(OSError):
        write_text(_disk_cache(), json.dumps(entries, indent=0))


def file_sha256(path: str | os.PathLike[str], cancel: CancelToken = None) -> str | None:
    """Hex sha256 of the whole file (cached per process); None if cancelled before it was done."""
    path = Path(path)
    key = _cache_key(path)
    with _cache_lock:
        _load_disk_cache()
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
        _save_disk_cache()
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
