"""What counts as a Linear layer, in our models and in the hosts'.

Forge builds its UNets and text encoders with its own `ForgeOperations.Linear` (put in place of
`torch.nn.Linear` while a model is constructed), a plain `nn.Module` rather than an `nn.Linear`: it
has `in_features`, `out_features`, a `weight` [out, in] and an optional `bias`, and computes the
linear map (casting its weight to the input's dtype when Forge casts manually). Code that looks for
Linear layers to hook (the module map, hypernetwork sites) or to run on tokens asks `is_linear`, so
such layers count as what they are.
"""

from __future__ import annotations

from torch import Tensor, nn


def is_linear(module: nn.Module) -> bool:
    """An `nn.Linear`, or a layer that is one in all but its class: `in_features` and `out_features`
    that match a 2-D `weight` [out, in]."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.ndim == 2
        and getattr(module, "in_features", None) == weight.shape[1]
        and getattr(module, "out_features", None) == weight.shape[0]
    )
