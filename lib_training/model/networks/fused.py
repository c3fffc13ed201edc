"""Fused projections: several Linear layers that read the same input, computed as one matmul; and
single Linear layers as one autograd node.

The layers keep their own parameters (so state dicts and checkpoint keys stay 1:1); only the
computation is joined: the weights [out_i, in] are concatenated along the output dimension per
call, one `F.linear` runs over them, and the result is split back. Gradients reach each layer's own
weight through the concatenation.

Fusing is only allowed while every layer is a plain `nn.Linear` that nothing has changed: a LoRA or
hypernetwork sets a `forward` on the instance (`lib_training.model.hooks.ModuleHooks`) and torch
hooks sit in the hook dicts; either makes `fusable` false, and the callers then call each layer on
its own so that the override is honoured.

`linear(module, x)` is `module(x)` for one Linear: a plain one runs through the same autograd
function, so that a step has one node per layer instead of F.linear's view, transpose and addmm
nodes (and their backward views), about a quarter fewer operators per layer; the kernels are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from lib_training.model.layers import is_linear


def is_plain_linear(module: nn.Module) -> bool:
    """True when `module(x)` is exactly `F.linear(x, module.weight, module.bias)`."""
    return type(module) is nn.Linear and not _hooked(module)


def _hooked(module: nn.Module) -> bool:
    """A forward set on the instance, or any torch hook on it."""
    return (
        "forward" in module.__dict__
        or bool(module._forward_hooks)
        or bool(module._forward_pre_hooks)
        or bool(module._backward_hooks)
        or bool(getattr(module, "_backward_pre_hooks", None))
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


def is_plain_pointwise_conv(module: nn.Module) -> bool:
    """True when `module` is a plain 1x1 Conv2d (stride 1, no padding, one group): a Linear over channels."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
        and not _hooked(module)
    )


def runs_on_tokens(module: nn.Module) -> bool:
    """Whether `linear(module, tokens)` applies `module` to tokens [..., channels]: any Linear, or a
    plain 1x1 convolution (computed as the Linear it is)."""
    return is_linear(module) or (is_plain_pointwise_conv(module) and _no_global_hooks())


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` for a Linear layer, x [..., in] -> [..., out]: one autograd node when it is plain (see the
    module docstring); a hooked or overridden layer (a LoRA, a hypernetwork) is called as a module.
    A plain 1x1 Conv2d (see `runs_on_tokens`) is applied to x's last dimension in the same way."""
    plain = is_plain_linear(module) or is_plain_pointwise_conv(module)
    if not (plain and _no_global_hooks()):
        return module(x)
    params = (module.weight,) if module.bias is None else (module.weight, module.bias)
    return _JointLinear.apply(x, 1, *params)


def fused_linear(x: Tensor, linears: Sequence[nn.Module]) -> list[Tensor]:
    """x [..., in] -> [linear(x) for linear in linears] ([..., out_i] each), with one matmul."""
    return list(joint_linear(x, linears).split([m.weight.shape[0] for m in linears], dim=-1))


class _JointLinear(torch.autograd.Function):
    """F.linear over concatenated weights, saving the parts instead of the concatenation.

    A weight may be a 1x1 convolution's [out, in, 1, 1] (used as [out, in]); its gradient has its shape.
    Runs under the caller's autocast in the forward pass; the backward pass computes in the dtype
    the forward's matmul used (the dtype of the output gradient). Written for few operators per call:
    each line below is one operator dispatched from Python, and views are used where they suffice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, count: int, *params: Tensor) -> Tensor:
        weights, biases = params[:count], params[count:]
        weight = _joined([_matrix(w) for w in weights])  # [sum(out_i), in]
        ctx.count, ctx.has_bias = count, bool(biases)
        ctx.sizes = [w.shape[0] for w in weights]
        # The input only for weight gradients (a frozen model keeps no activation for this layer): as rows
        # [tokens, in] when that is a view, else as it is (a copy would cost memory until the backward pass).
        rows = None
        if any(ctx.needs_input_grad[2 : 2 + count]):
            rows = x.view(-1, x.shape[-1]) if x.is_contiguous() else x
        ctx.save_for_backward(rows, *weights)
        return F.linear(x, weight, _joined(biases) if biases else None)  # [..., sum(out_i)]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        flat = _rows(grad)  # [tokens, sum(out_i)]
        grad_x = None
        if needs[0]:
            weight = _cast(_joined([_matrix(w) for w in weights]), grad.dtype)
            grad_x = torch.mm(flat, weight).view(*grad.shape[:-1], weight.shape[1])  # [..., in]
        grad_weights: list[Tensor | None] = [None] * ctx.count
        grad_biases: list[Tensor | None] = [None] * ctx.count if ctx.has_bias else []
        if any(needs[2 : 2 + ctx.count]):
            rows = rows if rows.dim() == 2 else _rows(rows)
            joint = torch.mm(flat.transpose(0, 1), _cast(rows, grad.dtype))  # [sum(out_i), in]
            parts = joint.split(ctx.sizes) if ctx.count > 1 else (joint,)
            grad_weights = [
                (g if g.dim() == w.dim() else g.view(w.shape)) if need else None
                for g, w, need in zip(parts, weights, needs[2 : 2 + ctx.count])
            ]
        if ctx.has_bias and any(needs[2 + ctx.count :]):
            joint_bias = flat.sum(0)
            parts = joint_bias.split(ctx.sizes) if ctx.count > 1 else (joint_bias,)
            grad_biases = [g if need else None for g, need in zip(parts, needs[2 + ctx.count :])]
        return (grad_x, None, *grad_weights, *grad_biases)


def _matrix(weight: Tensor) -> Tensor:
    """A Linear's weight [out, in] as it is; a 1x1 convolution's [out, in, 1, 1] viewed as [out, in]."""
    return weight if weight.dim() == 2 else weight.view(weight.shape[0], weight.shape[1])


def _rows(t: Tensor) -> Tensor:
    """[..., n] -> [rows, n]: a view when `t` is contiguous (one operator), else a reshape."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


def _joined(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors concatenated along dim 0; a single one as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
