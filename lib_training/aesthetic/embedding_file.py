"""Aesthetic embedding files: one tensor [1, D] of CLIP image features, in a `.pt` the WebUIs open.

The aesthetic-gradients extension saves `torch.save(mean_features)` with mean_features [1, 768]
(CLIP ViT-L/14 image features, not normalised). Published files also come in fp16 and as [768];
both are read. We write fp32 [1, D] through `pt_format.save_pt_for_webui`, so A1111's restricted
unpickler opens it whatever torch version wrote it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lib_training.errors import UserError
from lib_training.formats.pt_format import save_pt_for_webui

SUFFIXES = (".pt", ".safetensors")


@dataclass(frozen=True)
class AestheticEmbedding:
    """A loaded aesthetic embedding: raw (unnormalised) mean image features."""

    name: str
    features: Tensor  # [1, D] float32, on the CPU

    @property
    def width(self) -> int:
        return int(self.features.shape[1])

    @property
    def digest(self) -> str:
        """sha256 of the features (names the embedding in caches, whatever the file is called)."""
        return hashlib.sha256(self.features.numpy().tobytes()).hexdigest()

    def target(self) -> Tensor:
        """The normalised features [1, D] that the text features are pulled towards."""
        return self.features / self.features.norm(dim=-1, keepdim=True)


def as_features(tensor: Tensor, where: str) -> Tensor:
    """[1, D] or [D] (any float dtype) -> [1, D] float32; anything else is a UserError."""
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise UserError(f"{where} does not hold a tensor of image features; it is not an aesthetic embedding")
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] != 1 or tensor.shape[1] < 1:
        raise UserError(
            f"{where} holds a tensor of shape {list(tensor.shape)}; an aesthetic embedding is [1, D] or [D] "
            "(D = 768 for CLIP ViT-L/14)"
        )
    features = tensor.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(features).all() or not features.norm() > 0:
        raise UserError(f"{where} holds NaN, infinite or all-zero features; make the embedding again")
    return features


def load_embedding(path: str | os.PathLike[str]) -> AestheticEmbedding:
    """Read an aesthetic embedding (`.pt` of the extension, or a `.safetensors` holding one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"aesthetic embedding not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise UserError(f"{path.name} is not a readable safetensors file: {error}") from error
        if len(tensors) != 1:
            raise UserError(f"{path.name} holds {len(tensors)} tensors; an aesthetic embedding holds one")
        tensor = next(iter(tensors.values()))
    else:
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"{path.name} cannot be read as an aesthetic embedding (a .pt holding one tensor): {first}"
            ) from error
    return AestheticEmbedding(path.stem, as_features(tensor, path.name))


def save_embedding(path: str | os.PathLike[str], features: Tensor) -> Path:
    """Write features [1, D] (or [D]) as the extension's `.pt`: one fp32 tensor [1, D], atomically."""
    return save_pt_for_webui(path, as_features(features, "the features").clone())


def embedding_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Aesthetic embeddings in a folder by name (file stem), sorted; empty if the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    return {p.stem: p for p in found}
