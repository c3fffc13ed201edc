"""Fused projections: several Linear layers that read the same input, computed as one matmul.

The layers keep their own parameters (so state dicts and checkpoint keys stay 1:1); only the
computation is joined: the weights [out_i, in] are concatenated along the output dimension per
call, one `F.linear` runs over them, and the result is split back. Gradients reach each layer's own
weight through the concatenation.

Fusing is only allowed while every layer is a plain `nn.Linear` that nothing has changed: a LoRA or
hypernetwork sets a `forward` on the instance (`lib_training.model.hooks.ModuleHooks`) and torch
hooks sit in the hook dicts; either makes `fusable` false, and the callers then call each layer on
its own so that the override is honoured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals


def is_plain_linear(module: nn.Module) -> bool:
    """True when `module(x)` is exactly `F.linear(x, module.weight, module.bias)`."""
    return (
        type(module) is nn.Linear
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not module._backward_hooks
        and not getattr(module, "_backward_pre_hooks", None)
    )


def _no_global_hooks() -> bool:
    return not (
        _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
        or _module_globals._global_backward_hooks
        or getattr(_module_globals, "_global_backward_pre_hooks", None)
    )


def fusable(linears: Sequence[nn.Module]) -> bool:
    """Whether `linears` may run as one matmul: all plain, same input width, same dtype and device."""
    if len(linears) < 2 or not _no_global_hooks() or not all(is_plain_linear(m) for m in linears):
        return False
    first = linears[0].weight
    return (
        all(
            m.weight.shape[1] == first.shape[1] and m.weight.dtype == first.dtype and m.weight.device == first.device
            for m in linears
        )
        and len({m.bias is None for m in linears}) == 1
    )


def joint_linear(x: Tensor, linears: Sequence[nn.Module]) -> Tensor:
    """x [..., in] -> [..., sum(out_i)]: the outputs of `linears` side by side, from one matmul.

    The callers check `fusable(linears)` first. Autograd keeps only `x` and references to the
    layers' own weights for the backward pass (the concatenated weight is rebuilt there), so fusing
    costs no memory beyond the unfused layers'.
    """
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears if m.bias is not None]
    return _JointLinear.apply(x, len(weights), *weights, *biases)


def fused_linear(x: Tensor, linears: Sequence[nn.Module]) -> list[Tensor]:
    """x [..., in] -> [linear(x) for linear in linears] ([..., out_i] each), with one matmul."""
    return list(joint_linear(x, linears).split([m.weight.shape[0] for m in linears], dim=-1))


class _JointLinear(torch.autograd.Function):
    """F.linear over concatenated weights, saving the parts instead of the concatenation.

    Runs under the caller's autocast in the forward pass; the backward pass computes in the dtype
    the forward's matmul used (the dtype of the output gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, count: int, *params: Tensor) -> Tensor:
        weights, biases = params[:count], params[count:]
        weight = torch.cat(weights)  # [sum(out_i), in]
        bias = torch.cat(biases) if biases else None
        ctx.count, ctx.has_bias = count, bool(biases)
        ctx.sizes = [w.shape[0] for w in weights]
        # The input only for weight gradients (a frozen model keeps no activation for this layer).
        ctx.x_shape = x.shape
        ctx.save_for_backward(x if any(ctx.needs_input_grad[2 : 2 + count]) else None, *weights)
        flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        flat = grad.reshape(-1, grad.shape[-1])  # [tokens, sum(out_i)]
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(flat, _cast(torch.cat(weights), grad.dtype)).view(ctx.x_shape)  # [..., in]
        grad_weights: list[Tensor | None] = [None] * ctx.count
        grad_biases: list[Tensor | None] = [None] * ctx.count if ctx.has_bias else []
        if any(needs[2 : 2 + ctx.count]):
            joint = torch.mm(flat.t(), _cast(x.reshape(-1, x.shape[-1]), grad.dtype))  # [sum(out_i), in]
            grad_weights = [g if need else None for g, need in zip(joint.split(ctx.sizes), needs[2 : 2 + ctx.count])]
        if ctx.has_bias and any(needs[2 + ctx.count :]):
            joint_bias = flat.sum(0)
            grad_biases = [g if need else None for g, need in zip(joint_bias.split(ctx.sizes), needs[2 + ctx.count :])]
        return (grad_x, None, *grad_weights, *grad_biases)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
