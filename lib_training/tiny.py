"""Tiny random models with the real block structure of each family, for demos and tests."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter of `module` a random, well-scaled value (deterministic for a seeded generator).

    Matrices and kernels get N(0, 1/fan_in) so activations keep their scale through deep stacks;
    normalisation scales get 1 + N(0, 0.1^2); biases and 1-D parameters N(0, 0.02^2); embedding
    tables N(0, 0.02^2) like CLIP's. Layers that real models zero-initialise (output projections)
    are randomised too, so every path of the model affects the output.
    """
    for name, param in module.named_parameters():
        if param.ndim >= 2 and ("embedding" in name or name.endswith("positional_embedding")):
            values = torch.randn(param.shape, generator=generator) * 0.02
        elif param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
        elif _is_norm_scale(name):
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            values = 0.02 * torch.randn(param.shape, generator=generator)
        param.copy_(values.to(param.dtype))


def _is_norm_scale(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    owner = leaf[-2] if len(leaf) >= 2 else ""
    return name.endswith("weight") and ("norm" in owner or owner.startswith("ln") or owner == "layer_norm")
