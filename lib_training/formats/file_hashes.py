"""File hashes as A1111 records them: the sha256 of the whole file, and the old 8-digit "model hash".

Hashing a 7 GB checkpoint takes seconds, so results are kept (by path, size and modification time)
in memory and in `hashes.json` in the user cache folder, as A1111 keeps its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from lib_training.formats.atomic import write_text
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


def file_sha256(path: str | os.PathLike[str], stop: Callable[[], bool] | None = None) -> str | None:
    """Hex sha256 of the whole file (remembered, see the module docstring); None if `stop()` turned
    true before it was done."""
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
            if stop is not None and stop():
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


def cached_sha256(path: str | os.PathLike[str]) -> str | None:
    """The file's sha256 if it is already known (in memory or in hashes.json); never reads the file."""
    try:
        key = _cache_key(Path(path))
    except OSError:
        return None
    with _cache_lock:
        _load_disk_cache()
        return _cache.get(key)


def remember_sha256(path: str | os.PathLike[str], value: str) -> None:
    """Record a file's sha256 known from elsewhere (a host's hash cache), so it is not recomputed."""
    with _cache_lock:
        _cache[_cache_key(Path(path))] = value


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111's old "model hash": sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
