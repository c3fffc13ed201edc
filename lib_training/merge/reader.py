"""Reading model files tensor by tensor, or part of a tensor at a time, for streaming merges.

Safetensors files are read with plain reads at the offsets their header gives, not memory-mapped:
a mapping keeps every page it touched in the process's resident memory, so streaming a 7 GB file
through `safe_open` would show a 7 GB RSS although nothing needs it. Plain reads go through the
page cache and leave the process small. Pickled `.ckpt` files cannot be read in parts: they are
loaded whole (safely, see `lib_training.formats.tensor_files.open_tensors`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib_training.errors import CheckpointError
from lib_training.formats.safetensors_writer import DTYPE_NAMES
from lib_training.formats.tensor_files import (
    PICKLE_SUFFIXES,
    TensorSource,
    open_tensors,
    read_safetensors_header,
)

_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class StreamingSafetensorsSource(TensorSource):
    """A safetensors file read by offset: `get` one tensor, or `get_flat_range` part of one."""

    def __init__(self, path: Path) -> None:
        header = read_safetensors_header(path)
        metadata = header.pop("__metadata__", None) or {}
        super().__init__(path, {str(k): str(v) for k, v in metadata.items()})
        self._info: dict[str, dict[str, Any]] = header
        self._data_start = 8 + _header_length(path)
        self._file = open(path, "rb")  # noqa: SIM115  (closed by close())
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._info[key]["dtype"]
        if name not in _DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {key!r} has dtype {name}, which is unsupported")
        return _DTYPES[name]

    def get(self, key: str) -> Tensor:
        return self.get_flat_range(key, 0, self.numel(key)).reshape(self.shape(key))

    def numel(self, key: str) -> int:
        count = 1
        for size in self.shape(key):
            count *= size
        return count

    def get_flat_range(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Elements [start, stop) of the flattened tensor, as a 1-D CPU tensor.

        With `out` (a uint8 CPU tensor of enough bytes) the data is read into it and a view of it is
        returned; otherwise into a new tensor.
        """
        dtype = self.dtype(key)
        item = dtype.itemsize
        begin, end = self._info[key]["data_offsets"]
        if not 0 <= start <= stop <= (end - begin) // item:
            raise IndexError(f"{key}: range [{start}, {stop}) outside the tensor")
        count = (stop - start) * item
        buffer = torch.empty(count, dtype=torch.uint8) if out is None else out[:count]
        if buffer.numel():
            view = memoryview(buffer.numpy())
            with self._lock:
                self._file.seek(self._data_start + begin + start * item)
                got = self._file.readinto(view)
            if got != buffer.numel():
                raise CheckpointError(f"{self.path.name} ended while reading {key}: the file is truncated")
        return buffer.view(dtype)

    def prefetch(self, key: str) -> None:
        """Ask the OS to start reading `key`'s bytes in the background (a hint; no-op where unsupported)."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None or self._file is None:
            return
        begin, end = self._info[key]["data_offsets"]
        advise(self._file.fileno(), self._data_start + begin, end - begin, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None  # type: ignore[assignment]


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def open_input(path: str | os.PathLike[str]) -> TensorSource:
    """Open a model file for streaming: safetensors read by offset, pickles loaded whole and safely."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() not in PICKLE_SUFFIXES:
        try:
            return StreamingSafetensorsSource(path)
        except CheckpointError:
            if path.suffix.lower() == ".safetensors":
                raise
    return open_tensors(path)  # pickles, and the errors for missing files and folders


def get_flat_range(source: TensorSource, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
    """Elements [start, stop) of `key` flattened, from any source (a loaded pickle is sliced).

    `out`, a uint8 buffer, may receive the data (see `StreamingSafetensorsSource.get_flat_range`).
    """
    if isinstance(source, StreamingSafetensorsSource):
        return source.get_flat_range(key, start, stop, out)
    return source.get(key).reshape(-1)[start:stop]


def prefetch(source: TensorSource, key: str) -> None:
    """Hint that `key` of `source` will be read soon (streamed safetensors only)."""
    if isinstance(source, StreamingSafetensorsSource):
        source.prefetch(key)


def is_loaded_whole(source: TensorSource) -> bool:
    """Whether the source holds all its tensors in memory (a pickle) rather than reading on demand."""
    return not isinstance(source, StreamingSafetensorsSource)
