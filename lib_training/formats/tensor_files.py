"""Reading and writing tensor files: `.safetensors` (lazily) and pickled `.ckpt`/`.pt` (safely).

Pickles are only ever opened with `torch.load(..., weights_only=True)`: a file that would run code
or build arbitrary objects is refused with a message. Nested dicts and lists in a pickle are
flattened to dotted keys (`{"string_to_param": {"*": t}}` -> `"string_to_param.*"`), and a
checkpoint's `state_dict` wrapper is unwrapped, so every file reads as one flat name -> tensor map;
non-tensor values (a step count, a name) are kept apart in `extras`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from lib_training.errors import CheckpointError

SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # bytes; the format's own limit
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorSource(ABC):
    """Read access to the tensors of one file, by name, without loading what is not asked for."""

    def __init__(self, path: Path, metadata: dict[str, str], extras: dict[str, Any] | None = None) -> None:
        self.path = path
        self.metadata = metadata  # safetensors `__metadata__` (str -> str); empty for pickles
        self.extras = extras or {}  # non-tensor values of a pickle, by dotted key

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, key: str) -> torch.dtype: ...

    @abstractmethod
    def get(self, key: str) -> Tensor:
        """The tensor, on the CPU, in its stored dtype."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self.keys()}

    def load_all(self) -> dict[str, Tensor]:
        return {key: self.get(key) for key in self.keys()}

    def close(self) -> None:  # noqa: B027  (optional for subclasses)
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path) -> None:
        header = read_safetensors_header(path)
        metadata = header.pop("__metadata__", None) or {}
        super().__init__(path, {str(k): str(v) for k, v in metadata.items()})
        self._header: dict[str, dict[str, Any]] = header
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path.name} is not a readable safetensors file: {error}") from error

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._header[key]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {key!r} has dtype {name}, which is not supported")
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> Tensor:
        return self._file.get_tensor(key)

    def close(self) -> None:
        self._file = None  # safe_open has no explicit close; dropping it releases the mapping


class DictSource(TensorSource):
    """Tensors already in memory (a loaded pickle, or a test's dict)."""

    def __init__(
        self,
        path: Path,
        tensors: Mapping[str, Tensor],
        metadata: dict[str, str] | None = None,
        extras: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(path, metadata or {}, extras)
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> Tensor:
        return self._tensors[key]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size.

    Raises CheckpointError for a file that is truncated, too small or not safetensors at all.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name} is not a safetensors file: it is only {size} bytes long")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > SAFETENSORS_HEADER_LIMIT or header_len > size - 8:
            raise CheckpointError(
                f"{path.name} is not a valid safetensors file: its header claims {header_len} bytes but the "
                f"file has {size}. The file is truncated (an interrupted download?) or in another format."
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path.name} is not a valid safetensors file: its header is not JSON") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a valid safetensors file: its header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as error:
            raise CheckpointError(f"{path.name}: the header entry for {key!r} is malformed") from error
    data_size = size - 8 - header_len
    if end > data_size:
        raise CheckpointError(
            f"{path.name} is truncated: its header describes {end} bytes of tensor data but only {data_size} "
            "are there. Download or copy the file again."
        )
    return header


class _LightningCheckpointStub:
    """Stands in for the PyTorch Lightning callback object some original .ckpt files carry."""

    def __setstate__(self, state: object) -> None:
        pass


_LightningCheckpointStub.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
_LightningCheckpointStub.__qualname__ = _LightningCheckpointStub.__name__ = "ModelCheckpoint"


def _harmless_globals() -> list[Any]:
    """Non-tensor objects that real SD checkpoints pickle and that cannot run code."""
    import numpy as np

    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    # nn.ParameterDict: how the original textual-inversion code stored `string_to_param`.
    allowed: list[Any] = [_LightningCheckpointStub, np.dtype, torch.nn.ParameterDict]
    # numpy 1 pickles name it numpy.core..., numpy 2 pickles numpy._core...
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return allowed


def _torch_load_safely(path: Path) -> Any:
    mmap = zipfile.is_zipfile(path)  # pages tensors in on demand instead of reading the file twice
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allowed = contextlib.nullcontext() if safe_globals is None else safe_globals(_harmless_globals())  # torch < 2.5
    with allowed:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor], extras: dict[str, Any]) -> None:
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, (Mapping, torch.nn.ParameterDict)):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), tensors, extras)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Tensor, Mapping)) for v in obj):
        for index, value in enumerate(obj):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), tensors, extras)
    else:
        extras[prefix] = obj


def open_pickle(path: Path) -> DictSource:
    try:
        obj = _torch_load_safely(path)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refused to load {path.name}: it is a pickle that contains more than tensors "
            f"({_unsafe_global(error)}). Such a file can run code when opened, so it was not. If you trust "
            "it, convert it to .safetensors with a tool you trust; prefer .safetensors downloads."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path.name} could not be read as a PyTorch file ({_first_line(error)}). It may be truncated or "
            "not a model file."
        ) from error
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a dict of tensors")
    tensors: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    _flatten(obj, "", tensors, extras)
    return DictSource(path, tensors, extras=extras)


def _unsafe_global(error: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"it refers to {found.group(1)}" if found else _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def open_tensors(path: str | os.PathLike[str]) -> TensorSource:
    """Open a .safetensors file lazily, or a pickled .ckpt/.pt/.pth/.bin safely and whole."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a .safetensors or .ckpt file")
    if path.suffix.lower() == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return open_pickle(path)
    # Unknown extension: recognise by content.
    if zipfile.is_zipfile(path):
        return open_pickle(path)
    return SafetensorsSource(path)


def save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors atomically (temporary file, then rename); metadata values must be strings.

    The file is laid out as `safetensors.torch.save_file` lays it out, with the metadata sorted by
    key, so the same tensors and metadata always give the same bytes.
    """
    from lib_training.formats.safetensors_writer import StreamWriter, TensorEntry

    if metadata and not all(isinstance(v, str) for v in metadata.values()):
        raise TypeError("safetensors metadata values must be strings")
    entries = [TensorEntry(key, t.dtype, tuple(t.shape)) for key, t in tensors.items()]
    with StreamWriter(path, entries, dict(metadata) if metadata else None) as writer:
        for entry in writer.layout.entries:
            writer.write(tensors[entry.name].detach().to("cpu").contiguous().reshape(-1))
        writer.finish()
