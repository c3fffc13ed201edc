"""Reading and writing kohya-format LoRA files (`NAME.lora_down.weight`, `NAME.lora_up.weight`, `NAME.alpha`,
and for DoRA `NAME.dora_scale`).

A module's update to its weight W [out, in(, kh, kw)] is scale · up @ down with scale = alpha / rank,
up [out, rank(, 1, 1)], down [rank, in(, kh, kw)]; a DoRA module also rescales W + update by its
`dora_scale`, [1, in(, 1, 1)] per input channel or [out, 1(, 1, 1)] per output (`lib_training.merge.dora`).
Other adapter types (LoHa, LoKr, ...) are refused with a message rather than misread.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from lib_training.errors import CheckpointError
from lib_training.formats.safetensors_writer import (
    StreamWriter,
    TensorEntry,
    WriteResult,
    placeholder,
    plan_layout,
    tensor_bytes,
)
from lib_training.formats.tensor_files import open_tensors
from lib_training.merge.dora import checked_dora_scale, dora_change, fitted_dora_scale

_PART = re.compile(r"^(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
_OTHER_ADAPTERS = {  # a part of a key -> what the file is
    ".hada_": "a LoHa adapter",
    ".lokr_": "a LoKr adapter",
    ".oft_": "an OFT adapter",
    ".lora_mid.": "a LoCon with a CP decomposition (lora_mid)",
    ".w_norm": "a norm adapter",
    ".lora_A.": "a PEFT/diffusers LoRA (lora_A/lora_B)",
}
_FULL_DIFFERENCE = (".diff", ".diff_b")  # key endings of a LyCORIS 'full' (full-weight difference) adapter
# Key beginnings of a full checkpoint in the LDM layout (UNet, VAE, SD1/SD2 and SDXL text encoders).
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
_IGNORED = ("bundle_emb.",)  # embeddings bundled with a LoRA: not part of a checkpoint's weights


@dataclass
class LoraModule:
    """One adapted layer of a LoRA."""

    name: str  # kohya module name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    down: Tensor  # [rank, in] or [rank, in, kh, kw]
    up: Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float
    dora_scale: Tensor | None = None  # DoRA: [1, in(, 1, 1)] (per input) or [out, 1(, 1, 1)] (per output)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight the module changes: [out, in] or [out, in, kh, kw]."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, device: torch.device | str = "cpu") -> Tensor:
        """scale · up @ down in fp32, shaped like the weight it changes."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)  # [out, rank]
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)  # [rank, in·kh·kw]
        return (up @ down).reshape(self.weight_shape) * self.scale

    def change(self, weight: Tensor, multiplier: float) -> Tensor:
        """W' − W at strength `multiplier` for the weight W [out, in(, kh, kw)] this module adapts, fp32 on
        W's device: multiplier · delta, or DoRA's change (`lib_training.merge.dora`)."""
        delta = self.delta(weight.device).reshape(weight.shape)
        if self.dora_scale is None:
            return multiplier * delta
        dora_scale = fitted_dora_scale(self.dora_scale.to(weight.device), tuple(weight.shape))
        return dora_change(weight, delta, dora_scale, multiplier)


def read_lora(path: str | os.PathLike[str]) -> tuple[dict[str, LoraModule], dict[str, str], list[str]]:
    """The modules of a kohya LoRA file, its metadata, and the keys it holds that are not modules."""
    path = Path(path)
    with open_tensors(path) as source:
        keys = source.keys()
        if any(key.startswith(_CHECKPOINT_PREFIXES) for key in keys):
            raise CheckpointError(
                f"{path.name} is a full checkpoint, not a LoRA. Give a LoRA file (lora_up, lora_down, alpha) "
                "here; a checkpoint is the model a LoRA is baked into (--model)"
            )
        found_kinds = [kind for marker, kind in _OTHER_ADAPTERS.items() if any(marker in key for key in keys)]
        if any(key.endswith(_FULL_DIFFERENCE) for key in keys):
            found_kinds.append("a full-weight difference (LyCORIS 'full') adapter")
        if found_kinds:
            raise CheckpointError(
                f"{path.name} is {found_kinds[0]}; only kohya LoRA / LoCon / DoRA files (lora_up, lora_down, "
                "alpha, dora_scale) can be baked, resized or merged here"
            )
        parts: dict[str, dict[str, Tensor]] = {}
        ignored: list[str] = []
        for key in keys:
            if key.startswith(_IGNORED):
                ignored.append(key)
                continue
            found = _PART.match(key)
            if found is None:
                raise CheckpointError(
                    f"{path.name} has a key {key!r} that is not part of a kohya LoRA module; it may be a "
                    "checkpoint or another kind of file"
                )
            parts.setdefault(found["name"], {})[found["part"]] = source.get(key)
        metadata = dict(source.metadata)
    if not parts:
        raise CheckpointError(f"{path.name} holds no LoRA modules")
    modules: dict[str, LoraModule] = {}
    for name, found in parts.items():
        down, up, alpha, dora_scale = module_weights(path, name, found)
        modules[name] = LoraModule(name, down, up, alpha, dora_scale)
    return modules, metadata, ignored


def module_weights(path: Path, name: str, found: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, float, Tensor | None]:
    """(down, up, alpha, dora_scale or None) of one kohya module from its parts ("lora_down.weight",
    "lora_up.weight", "alpha", "dora_scale"); a CheckpointError naming the file and module if a weight is
    missing, the two do not multiply or the DoRA magnitude does not fit them. Without an alpha, alpha is
    the rank (scale 1), as the loaders read it. dora_scale comes shaped [1, in(, 1, 1)] or [out, 1(, 1, 1)]."""
    if "lora_down.weight" not in found or "lora_up.weight" not in found:
        raise CheckpointError(f"{path.name}: module {name} lacks its lora_up or lora_down weight")
    down, up = found["lora_down.weight"], found["lora_up.weight"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise CheckpointError(
            f"{path.name}: module {name} has lora_up {list(up.shape)} and lora_down {list(down.shape)}, "
            "which do not multiply"
        )
    alpha = float(found["alpha"].item()) if "alpha" in found else float(down.shape[0])
    dora_scale = found.get("dora_scale")
    if dora_scale is not None:
        dora_scale = checked_dora_scale(path, name, dora_scale, (int(up.shape[0]), *down.shape[1:]))
    return down, up, alpha, dora_scale


class LoraWeights(Protocol):
    """What a kohya module's tensors are made of (a `LoraModule`, or a trained network's weights)."""

    down: Tensor
    up: Tensor
    alpha: float
    dora_scale: Tensor | None


def lora_tensors(modules: Mapping[str, LoraWeights], dtype: torch.dtype) -> dict[str, Tensor]:
    """The file's tensors for `modules`, every one (alpha and dora_scale included) in `dtype`, as kohya saves
    them."""
    tensors: dict[str, Tensor] = {}
    for name, module in modules.items():
        tensors[f"{name}.lora_down.weight"] = module.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = module.up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=dtype)
        if module.dora_scale is not None:
            tensors[f"{name}.dora_scale"] = module.dora_scale.detach().to("cpu", dtype).contiguous()
    return tensors


def legacy_hash_of(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> str:
    """kohya's `sshs_legacy_hash`: sha256 of the 64 KiB at offset 1 MiB of the file that `tensors` and
    `metadata` make, first 8 hex digits."""
    layout = plan_layout([TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata)
    start, stop = 0x100000, 0x110000
    prefix = len(layout.header).to_bytes(8, "little") + layout.header
    chunk = bytearray(prefix[start:stop])
    position = len(prefix)
    for entry in layout.entries:
        if position >= stop:
            break
        data = tensor_bytes(tensors[entry.name])
        lo, hi = max(start, position), min(stop, position + data.nbytes)
        if lo < hi:
            chunk += data[lo - position : hi - position]
        position += data.nbytes
    return hashlib.sha256(bytes(chunk)).hexdigest()[:8]


def write_lora(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> WriteResult:
    """Write a LoRA file atomically with kohya's hashes and ModelSpec's.

    `sshs_model_hash` (sha256 of the data section: the same whatever the metadata) and
    `modelspec.hash_sha256` ("0x" + the same digest) are filled in as the data is written;
    `sshs_legacy_hash` is computed, as kohya does, on the file with only the ss_* metadata.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data_token = placeholder(64)
    final = dict(metadata)
    final["sshs_model_hash"] = data_token
    final["sshs_legacy_hash"] = legacy_hash_of(tensors, ss_only)
    final["modelspec.hash_sha256"] = "0x" + data_token
    with StreamWriter(
        path, [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], final, placeholders=[data_token]
    ) as writer:
        for entry in writer.layout.entries:
            writer.write(tensors[entry.name])
        return writer.finish(lambda digest: {data_token: digest})
