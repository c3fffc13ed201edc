"""A1111's hypernetwork `.pt` files: read (old files too) and write exactly as A1111 saves them.

The file is a pickled dict (torch zip format):

    {768: (state_dict_k, state_dict_v), 320: (...), ...,   # int keys: context widths
     "step": int, "name": str, "layer_structure": [float, ...], "activation_func": str | None,
     "is_layer_norm": bool, "weight_initialization": str, "sd_checkpoint": str | None,
     "sd_checkpoint_name": str | None, "activate_output": bool, "use_dropout": bool,
     "dropout_structure": [float, ...], "last_layer_dropout": bool, "optional_info": str | None}

in that order; each state dict is the `OrderedDict` of a module's `state_dict()` (keys
`linear.N.weight` / `linear.N.bias`, N the position in the module's Sequential). Files are written
through `pt_format.save_pt_for_webui`, so A1111's restricted unpickler opens them whatever torch
version wrote them, and read with `weights_only=True`.

Reading fills what old files lack with A1111's defaults (layer structure 1, 2, 1; no activation;
Normal init; no layer norm; activate_output True; a dropout structure derived from use_dropout
and last_layer_dropout) and renames the first files' keys (`linear1.*`, `linear2.*`).

Optimizer state goes beside the file as `NAME.pt.optim`: {"optimizer_name": "AdamW", "hash": the
first 10 hex digits of the sha256 of NAME.pt, "optimizer_state_dict": ...}; A1111 uses it only
when the hash matches the file.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib_training.errors import CheckpointError
from lib_training.formats.pt_format import save_pt_for_webui

_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}
OPTIM_SUFFIX = ".optim"
A1111_DROPOUT = 0.3  # the probability in files that have use_dropout but no dropout structure


@dataclass
class HypernetworkFile:
    """The contents of a hypernetwork file (names as in the file; see the module docstring)."""

    name: str
    layers: dict[int, tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]]  # width -> (k, v)
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation_func: str | None = "linear"
    weight_initialization: str = "Normal"
    is_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    last_layer_dropout: bool = False
    activate_output: bool = False
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None

    def to_dict(self) -> dict[Any, Any]:
        """The dict A1111 pickles, keys in A1111's order."""
        out: dict[Any, Any] = {}
        for width, (k, v) in self.layers.items():
            out[int(width)] = (_cpu_state(k), _cpu_state(v))
        out.update(
            step=int(self.step),
            name=self.name,
            layer_structure=list(self.layer_structure),
            activation_func=self.activation_func,
            is_layer_norm=bool(self.is_layer_norm),
            weight_initialization=self.weight_initialization,
            sd_checkpoint=self.sd_checkpoint,
            sd_checkpoint_name=self.sd_checkpoint_name,
            activate_output=bool(self.activate_output),
            use_dropout=bool(self.use_dropout),
            dropout_structure=list(self.dropout_structure),
            last_layer_dropout=bool(self.dropout_structure[-2] != 0) if len(self.dropout_structure) > 1 else False,
            optional_info=self.optional_info or None,
        )
        return out


def _cpu_state(state: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """A CPU copy (each tensor owning its storage), keeping the `_metadata` that a module's state_dict
    carries (A1111's files have it)."""
    out: OrderedDict[str, Tensor] = OrderedDict((k, t.detach().cpu().clone()) for k, t in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def write_hypernetwork(path: str | os.PathLike[str], hypernetwork: HypernetworkFile) -> Path:
    """Write `hypernetwork` as A1111 saves it, atomically (see the module docstring)."""
    return save_pt_for_webui(path, hypernetwork.to_dict())


def read_hypernetwork(path: str | os.PathLike[str]) -> HypernetworkFile:
    """A hypernetwork file (A1111's, any age, or ours); CheckpointError if it is not one."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"there is no hypernetwork file {path}") from None
    except Exception as error:
        raise CheckpointError(f"{path.name} cannot be read as a hypernetwork file ({error})") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path.name} is not a hypernetwork file (it holds a {type(data).__name__})")
    layers: dict[int, tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]] = {}
    for key, value in data.items():
        if not isinstance(key, int):
            continue
        if not (isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(s, Mapping) for s in value)):
            raise CheckpointError(f"{path.name}: the entry for width {key} is not a pair of state dicts (k, v)")
        layers[key] = (_renamed(value[0]), _renamed(value[1]))
    if not layers:
        raise CheckpointError(
            f"{path.name} has no hypernetwork modules (no integer width keys); is it an embedding or a LoRA?"
        )
    layer_structure = [float(v) for v in data.get("layer_structure") or [1, 2, 1]]
    dropout = data.get("dropout_structure")
    use_dropout = True if dropout is not None and any(dropout) else bool(data.get("use_dropout", False))
    last_layer_dropout = bool(data.get("last_layer_dropout", False))
    if dropout is None:
        dropout = default_dropout_structure(layer_structure, use_dropout, last_layer_dropout)
    return HypernetworkFile(
        name=str(data.get("name") or path.stem),
        layers=layers,
        layer_structure=layer_structure,
        activation_func=data.get("activation_func"),
        weight_initialization=str(data.get("weight_initialization") or "Normal"),
        is_layer_norm=bool(data.get("is_layer_norm", False)),
        use_dropout=use_dropout,
        dropout_structure=[float(v) for v in dropout],
        last_layer_dropout=last_layer_dropout,
        activate_output=bool(data.get("activate_output", True)),
        step=int(data.get("step") or 0),
        sd_checkpoint=data.get("sd_checkpoint"),
        sd_checkpoint_name=data.get("sd_checkpoint_name"),
        optional_info=data.get("optional_info"),
    )


def _renamed(state: Mapping[str, Any]) -> OrderedDict[str, Tensor]:
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"a hypernetwork state dict holds {key!r}, which is not a tensor")
        out[_LEGACY_KEYS.get(key, key)] = tensor
    return out


def default_dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer: bool) -> list[float]:
    """The dropout structure A1111 assumes where a file has none: 0.3 after every hidden layer but the
    last, and after the last hidden layer too with `last_layer` (one entry per layer-structure entry)."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    hidden = [A1111_DROPOUT] * max(len(layer_structure) - 3, 0)
    return [0.0, *hidden, A1111_DROPOUT if last_layer else 0.0, 0.0][: len(layer_structure)]


# --- optimizer state beside the file ---------------------------------------------------------------


def file_shorthash(path: str | os.PathLike[str]) -> str:
    """The first 10 hex digits of the file's sha256 (A1111's `shorthash` of a hypernetwork)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def optim_path(path: str | os.PathLike[str]) -> Path:
    return Path(str(path) + OPTIM_SUFFIX)


def write_optimizer_state(path: str | os.PathLike[str], state: Mapping[str, Any], name: str = "AdamW") -> Path:
    """Write `state` (an optimizer's state_dict) as PATH.optim, tied to the file at `path` by its hash."""
    record = {"optimizer_name": name, "hash": file_shorthash(path), "optimizer_state_dict": _cpu(state)}
    return save_pt_for_webui(optim_path(path), record)


def read_optimizer_state(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]] | None:
    """(optimizer name, state) from PATH.optim when it belongs to the file at `path`; else None."""
    extra = optim_path(path)
    if not extra.is_file():
        return None
    try:
        record = torch.load(extra, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{extra.name} cannot be read ({error})") from None
    if not isinstance(record, Mapping) or record.get("hash") != file_shorthash(path):
        return None  # written for another version of the file
    state = record.get("optimizer_state_dict")
    return (str(record.get("optimizer_name") or "AdamW"), state) if isinstance(state, dict) else None


def _cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_cpu(v) for v in value)
    return value
