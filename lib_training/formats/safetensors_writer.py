"""Writing a safetensors file as a stream: the header first, from known names, dtypes and shapes, then
each tensor's bytes in header order.

The layout is the one `safetensors.torch.save_file` produces, so for the same tensors and metadata
the file is byte-identical: tensors sorted by dtype (in the reverse order of the format's dtype list,
so I64 before F64 before F32 before BF16 before F16 ... before BOOL), then by name; contiguous
offsets; compact JSON with `__metadata__` first; the header padded with spaces to a multiple of 8
bytes. (save_file writes the metadata entries in a random order, the Rust HashMap's; we write them
sorted by key, which is one of the orders it may produce.)

Values known only at the end (the sha256 of the tensor data, input hashes computed concurrently)
are written as fixed-width placeholders and patched in place when the data is complete; since a
placeholder is as long as its value, the file stays exactly what save_file would have written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import secrets
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lib_training.formats.atomic import OutputError, atomic_path

# The safetensors dtype names, in the order of the format's dtype enum (files sort by it, descending).
_DTYPE_ORDER: tuple[tuple[str, torch.dtype | None], ...] = (
    ("BOOL", torch.bool),
    ("U8", torch.uint8),
    ("I8", torch.int8),
    ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
    ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
    ("I16", torch.int16),
    ("U16", getattr(torch, "uint16", None)),
    ("F16", torch.float16),
    ("BF16", torch.bfloat16),
    ("I32", torch.int32),
    ("U32", getattr(torch, "uint32", None)),
    ("F32", torch.float32),
    ("F64", torch.float64),
    ("I64", torch.int64),
    ("U64", getattr(torch, "uint64", None)),
)
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPE_ORDER if dtype is not None}
_DTYPE_RANK: dict[torch.dtype, int] = {dtype: rank for rank, (_, dtype) in enumerate(_DTYPE_ORDER) if dtype is not None}
ALIGNMENT = 8  # the header is padded to a multiple of this many bytes
SPACE_MARGIN = 16 * 1024 * 1024  # free space asked for beyond the file's size


class NotEnoughSpaceError(OutputError):
    """The output folder's disk cannot hold the file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file to be written: what the header says about it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """Where everything goes: the padded header bytes and the tensors in file order with their offsets."""

    header: bytes  # JSON, padded; the file starts with its length as 8 little-endian bytes
    entries: tuple[TensorEntry, ...]  # in file order
    offsets: tuple[int, ...]  # start of each entry in the data section
    data_size: int

    @property
    def file_size(self) -> int:
        return 8 + len(self.header) + self.data_size


def file_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The order save_file stores tensors in: dtype (descending in the format's list), then name."""
    return sorted(entries, key=lambda e: (-_DTYPE_RANK[e.dtype], e.name))


def plan_layout(entries: Iterable[TensorEntry], metadata: Mapping[str, str] | None = None) -> Layout:
    """The header and offsets of a file holding `entries`, laid out exactly as save_file does."""
    ordered = file_order(entries)
    header: dict[str, object] = {}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata keys and values must be strings (not for {bad[0]!r})")
        header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
    offsets: list[int] = []
    offset = 0
    for entry in ordered:
        if entry.dtype not in _DTYPE_RANK:
            raise TypeError(f"{entry.name}: dtype {entry.dtype} cannot be stored in safetensors")
        if entry.name in header:
            raise ValueError(f"tensor name {entry.name!r} appears twice (or is reserved)")
        end = offset + entry.nbytes
        header[entry.name] = {
            "dtype": DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, end],
        }
        offsets.append(offset)
        offset = end
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGNMENT)
    return Layout(raw, tuple(ordered), tuple(offsets), offset)


def placeholder(width: int) -> str:
    """A unique string of `width` characters to stand in the metadata for a value known only later."""
    token = "PENDING" + secrets.token_hex(16)
    if width < len(token):
        raise ValueError(f"a placeholder needs at least {len(token)} characters")
    return token + "0" * (width - len(token))


def check_free_space(folder: Path, needed: int) -> None:
    """Raise NotEnoughSpaceError unless `folder`'s disk has `needed` bytes (plus a margin) free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise NotEnoughSpaceError(
            f"not enough free disk space in {folder}: the output needs {_size(needed)} (and {_size(SPACE_MARGIN)} "
            f"to spare) and only {_size(free)} are free. Free some space or choose an output folder on another disk."
        )


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} bytes"


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (made contiguous), without a copy where possible."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


@dataclass(frozen=True)
class WriteResult:
    path: Path
    data_sha256: str  # hex sha256 of the data section (every tensor's bytes, in file order)
    size: int  # bytes in the file
    metadata: dict[str, str]  # as written, placeholders replaced


_STOP = object()


class StreamWriter:
    """Write a safetensors file whose header is known before its data; use as a context manager.

    The file goes to a temporary name beside `path` and is renamed over it only after `finish`;
    leaving the `with` block without `finish` (an error, a cancel) removes it. `write` takes the
    tensors' contents in file order (`layout.entries`), in pieces of any size, each a CPU tensor of
    the entry's dtype; a background thread writes them and computes the sha256 of the data, so
    computing the next piece overlaps with writing this one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Iterable[TensorEntry],
        metadata: Mapping[str, str] | None = None,
        *,
        placeholders: Sequence[str] = (),
        queue_pieces: int = 4,
    ) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata) if metadata is not None else None
        self.layout = plan_layout(entries, self.metadata)
        self._placeholders = tuple(placeholders)
        for token in self._placeholders:
            if token.encode() not in self.layout.header:
                raise ValueError(f"placeholder {token!r} does not occur in the metadata")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_pieces)
        self._stack = contextlib.ExitStack()
        self._hasher = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._file = None
        self._index = 0  # entry being written
        self._written = 0  # bytes of that entry already queued
        self._finished = False

    # --- context -------------------------------------------------------------------------------
    def __enter__(self) -> StreamWriter:
        check_free_space(self.path.parent, self.layout.file_size)
        try:
            self._tmp = self._stack.enter_context(atomic_path(self.path))
            self._file = self._stack.enter_context(open(self._tmp, "wb"))
            self._file.write(struct.pack("<Q", len(self.layout.header)))
            self._file.write(self.layout.header)
        except BaseException:
            self._stack.close()
            raise
        self._thread = threading.Thread(target=self._drain, name="safetensors-writer", daemon=True)
        self._thread.start()
        self._skip_empty()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._stop_thread()
        if exc is None and not self._finished:
            exc = RuntimeError("StreamWriter left without finish(); the output was discarded")
            self._stack.__exit__(type(exc), exc, None)
            raise exc
        self._stack.__exit__(exc_type, exc, tb)

    # --- writing -------------------------------------------------------------------------------
    @property
    def current(self) -> TensorEntry | None:
        """The entry the next piece belongs to (None when all data is written)."""
        return self.layout.entries[self._index] if self._index < len(self.layout.entries) else None

    def write(self, piece: Tensor) -> None:
        """Append the next part of the current entry's data (a CPU tensor of its dtype)."""
        self._raise_thread_error()
        entry = self.current
        if entry is None:
            raise ValueError("all tensors are already written")
        if piece.dtype != entry.dtype:
            raise ValueError(f"{entry.name}: got a {piece.dtype} piece for a {entry.dtype} tensor")
        data = tensor_bytes(piece)
        if self._written + data.nbytes > entry.nbytes:
            raise ValueError(f"{entry.name}: more data than its shape {list(entry.shape)} holds")
        if data.nbytes:
            self._put((piece, data))
        self._written += data.nbytes
        if self._written == entry.nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def finish(self, values: Mapping[str, str] | Callable[[str], Mapping[str, str]] | None = None) -> WriteResult:
        """Complete the file: wait for the data, patch placeholders with `values`, rename into place.

        `values` maps each placeholder to its final value (of the same length), or is a function
        from the data's sha256 (hex) to that mapping.
        """
        if self.current is not None:
            raise ValueError(f"{self.current.name} and later tensors were not written")
        self._stop_thread()
        self._raise_thread_error()
        values = dict((values(self._hasher.hexdigest()) if callable(values) else values) or {})
        missing = [token for token in self._placeholders if token not in values]
        if missing:
            raise ValueError(f"no value given for placeholder {missing[0]!r}")
        header = self.layout.header
        for token, value in values.items():
            if len(value.encode()) != len(token) or json.dumps(value, ensure_ascii=False)[1:-1] != value:
                raise ValueError(f"value {value!r} needs {len(token)} plain characters, as its placeholder")
            header = header.replace(token.encode(), value.encode())
        assert self._file is not None
        if header != self.layout.header:
            self._file.seek(8)
            self._file.write(header)
        self._file.flush()
        self._finished = True
        self._stack.close()  # closes the file, renames the temporary file over `path`
        metadata = None
        if self.metadata is not None:
            metadata = json.loads(header)["__metadata__"]
        return WriteResult(self.path, self._hasher.hexdigest(), self.layout.file_size, metadata or {})

    # --- background thread -----------------------------------------------------------------------
    def _skip_empty(self) -> None:
        while self.current is not None and self.current.nbytes == 0:
            self._index += 1

    def _put(self, item: object) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_thread_error()

    def _drain(self) -> None:
        assert self._file is not None
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep emptying the queue so the producer never blocks
            _, data = item  # type: ignore[misc]  # (tensor kept alive, its bytes)
            try:
                self._file.write(data)
                self._hasher.update(data)
            except BaseException as error:  # handed to the producing thread
                self._error = error

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._thread = None

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, OSError):
                raise OutputError(
                    f"could not write {self.path.name}: {error.strerror or error}; the partial file was removed"
                ) from error
            raise error
