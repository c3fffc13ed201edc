"""File hashes for merge metadata: computed once, remembered across runs by path, size and mtime."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lib_training.formats import file_hashes as hashing


@pytest.fixture()
def fresh_process(monkeypatch, tmp_path: Path):
    """Forget the in-memory cache, as a new process would, with a private cache folder."""
    monkeypatch.setenv("SDWT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_cache", {})
    monkeypatch.setattr(hashing, "_loaded_from_disk", False)

    def restart() -> None:
        hashing._cache.clear()
        hashing._loaded_from_disk = False

    return restart


def test_sha256_is_that_of_the_whole_file(fresh_process, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert hashing.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_later_run_reuses_the_hash_from_disk(fresh_process, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 1000)
    first = hashing.file_sha256(path)
    stat = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; put the old modification time back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fresh_process()
    assert hashing.file_sha256(path) == first  # served from hashes.json, the file was not read


def test_a_changed_file_is_hashed_again(fresh_process, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 1000)
    first = hashing.file_sha256(path)
    path.write_bytes(b"b" * 1001)
    fresh_process()
    assert hashing.file_sha256(path) == hashlib.sha256(b"b" * 1001).hexdigest() != first


def test_a_damaged_cache_file_is_ignored(fresh_process, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / hashing.CACHE_FILE
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    path = tmp_path / "m.bin"
    path.write_bytes(b"xyz")
    assert hashing.file_sha256(path) == hashlib.sha256(b"xyz").hexdigest()
