"""Sinusoidal embedding of timesteps (UNet) and of SDXL's size values."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[N] -> [N, dim] float32, as LDM and SGM compute it: the cosine half first, then the sine half."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=values.device) * (-math.log(max_period) / half)
    args = values.float()[:, None] * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
