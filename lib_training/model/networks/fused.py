"""Fused projections: several Linear layers that read the same input, computed as one matmul; and
single Linear layers as one autograd node.

The layers keep their own parameters (so state dicts and checkpoint keys stay 1:1); only the
computation is joined: the weights [out_i, in] are concatenated along the output dimension per
call, one `F.linear` runs over them, and the result is split back. Gradients reach each layer's own
weight through the concatenation.

Fusing is only allowed while every layer is an `nn.Linear` whose call the fused node computes: a
plain one, or one whose only change is a plain LoRA that marked its forward (`mark_low_rank`): its
term scale · (x @ down^T) @ up^T is then computed inside the same node (q/k/v stay one matmul). Any
other instance `forward` (a hypernetwork, a host's override, a second LoRA, a LoRA with dropout;
`lib_training.model.hooks.ModuleHooks`) or torch hook makes `fusable` false, and the callers then
call each layer on its own so that the override is honoured.

`linear(module, x)` is `module(x)` for one Linear: a plain one runs through the same autograd
function, so that a step has one node per layer instead of F.linear's view, transpose and addmm
nodes (and their backward views), about a quarter fewer operators per layer; the kernels are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from lib_training.model.layers import is_linear


@dataclass(frozen=True)
class LowRank:
    """A plain LoRA term a layer's output gets: scale · (x @ down^T) @ up^T.

    down [rank, in], up [out, rank] (a 1x1 convolution's: [rank, in, 1, 1] and [out, rank, 1, 1]).
    """

    down: Tensor
    up: Tensor
    scale: float


LOW_RANK = "low_rank"  # the attribute of a forward override that says it adds a `LowRank` (see mark_low_rank)


def mark_low_rank(forward: Callable[..., Any], term: Callable[[], LowRank | None]) -> None:
    """Declare that the instance `forward` just set on a Linear or 1x1 Conv2d (a LoRA's, wrapping the layer's
    own class forward and nothing else) computes the layer's `F.linear` plus `term()`; `term()` is None
    whenever it computes something else (dropout on, say). The fused paths then compute the layer and
    its term in one autograd node; anything set on the module after it hides the mark."""
    setattr(forward, LOW_RANK, term)


class _Overridden:
    """The layer's call does something the fused paths cannot compute (a hook, another override)."""


OVERRIDDEN = _Overridden()


def _adaptation(module: nn.Module) -> LowRank | _Overridden | None:
    """What `module(x)` computes beyond the layer's own forward: nothing (None), a marked `LowRank`, or
    something else (OVERRIDDEN): any torch hook, an unmarked instance forward, a mark whose term is off."""
    if _torch_hooked(module):
        return OVERRIDDEN
    forward = module.__dict__.get("forward")
    if forward is None:
        return None
    marked = getattr(forward, LOW_RANK, None)
    term = marked() if marked is not None else None
    if term is None or term.down.device != module.weight.device:
        return OVERRIDDEN
    return term


def _linear_like(module: nn.Module) -> bool:
    """An nn.Linear whose call the fused paths compute: plain, or with a marked LoRA term."""
    return type(module) is nn.Linear and not isinstance(_adaptation(module), _Overridden)


def _torch_hooked(module: nn.Module) -> bool:
    return (
        bool(module._forward_hooks)
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
    """Whether `linears` may run as one matmul: all plain or with a marked LoRA term (`mark_low_rank`),
    same input width, same dtype and device."""
    if len(linears) < 2 or not _no_global_hooks() or not all(_linear_like(m) for m in linears):
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
    """x [..., in] -> [..., sum(out_i)]: the outputs of `linears` side by side, from one matmul (and
    their LoRA terms, in the same autograd node).

    The callers check `fusable(linears)` first. Autograd keeps only `x` and references to the
    layers' own weights for the backward pass (the concatenated weight is rebuilt there), so fusing
    costs no memory beyond the unfused layers'.
    """
    return _apply(x, list(linears))


def is_pointwise_conv(module: nn.Module) -> bool:
    """True when `module` is a 1x1 Conv2d (stride 1, no padding, one group), a Linear over channels, whose
    call the fused paths compute (plain, or with a marked LoRA term)."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
        and not isinstance(_adaptation(module), _Overridden)
    )


def runs_on_tokens(module: nn.Module) -> bool:
    """Whether `linear(module, tokens)` applies `module` to tokens [..., channels]: any Linear, or a
    1x1 convolution the fused paths compute (as the Linear it is)."""
    return is_linear(module) or (is_pointwise_conv(module) and _no_global_hooks())


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` for a Linear layer, x [..., in] -> [..., out]: one autograd node when it is plain or
    has a marked LoRA term (see the module docstring); otherwise (a hook, a hypernetwork, a second LoRA)
    it is called as a module. A 1x1 Conv2d that `runs_on_tokens` is applied to x's last dimension in the
    same way."""
    if not ((_linear_like(module) or is_pointwise_conv(module)) and _no_global_hooks()):
        return module(x)
    return _apply(x, [module])


def fused_linear(x: Tensor, linears: Sequence[nn.Module]) -> list[Tensor]:
    """x [..., in] -> [linear(x) for linear in linears] ([..., out_i] each), with one matmul."""
    return list(joint_linear(x, linears).split([m.weight.shape[0] for m in linears], dim=-1))


def _apply(x: Tensor, layers: list[nn.Module]) -> Tensor:
    """The joint node over `layers` (checked by the callers): weights, biases, then the LoRA terms' downs and ups."""
    weights = [m.weight for m in layers]
    biases = [m.bias for m in layers if m.bias is not None]
    terms = [(i, t) for i, t in enumerate(_adaptation(m) for m in layers) if isinstance(t, LowRank)]
    if not terms:
        if not _records_grad(x, weights, biases):
            # Nothing to differentiate (a frozen layer on an input without gradient, or no_grad): no node needed.
            # This is also the path torch.compile traces, whose dynamo cannot trace the node's forward here.
            return F.linear(x, _joined([_matrix(w) for w in weights]), _joined(biases) if biases else None)
        return _JointLinear.apply(x, len(weights), (), (), *weights, *biases)
    adapted, scales = tuple(i for i, _ in terms), tuple(t.scale for _, t in terms)
    downs, ups = [t.down for _, t in terms], [t.up for _, t in terms]
    return _JointLinear.apply(x, len(weights), adapted, scales, *weights, *biases, *downs, *ups)


class _JointLinear(torch.autograd.Function):
    """F.linear over concatenated weights, saving the parts instead of the concatenation; plus, for the
    layers listed in `adapted`, their LoRA terms: out_i += scale_i · (x @ down_i^T) @ up_i^T.

    A weight may be a 1x1 convolution's [out, in, 1, 1] (used as [out, in]); its gradient has its shape.
    Runs under the caller's autocast in the forward pass; the backward pass computes in the dtype
    the forward's matmul used (the dtype of the output gradient). Written for few operators per call:
    each line below is one operator dispatched from Python, views are used where they suffice, and the
    LoRA scales ride on addmm's alpha. The LoRA terms (in the dtype of the output, `dt`):

        forward    h = x @ D^T [tokens, sum(rank_i)] (all downs at once);  out_i.addmm_(h_i, U_i^T, alpha=s_i)
        backward   gh_i = g_i @ U_i [tokens, rank_i];  grad_x += s_i · gh_i @ D_i (addmm_);
                   grad_U_i = s_i · g_i^T @ h_i;  grad_D_i = s_i · gh_i^T @ x   (addmm with beta 0)

    With LoRA terms the backward keeps `x` (in dt, as the unfused LoRA's down layer keeps it), h and the
    LoRA weights in dt (tiny), so it casts none of them again; no concatenation.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, count: int, adapted: tuple[int, ...], scales: tuple[float, ...], *params: Tensor
    ) -> Tensor:
        terms = len(adapted)
        weights, biases = params[:count], params[count : len(params) - 2 * terms]
        downs, ups = params[len(params) - 2 * terms : len(params) - terms], params[len(params) - terms :]
        weight = _joined([_matrix(w) for w in weights])  # [sum(out_i), in]
        ctx.count, ctx.has_bias, ctx.adapted, ctx.scales = count, bool(biases), adapted, scales
        ctx.sizes = [w.shape[0] for w in weights]
        bias = _joined(biases) if biases else None
        if not terms:
            out = F.linear(x, weight, bias)  # [..., sum(out_i)]
            # The input only for weight gradients (a frozen model keeps no activation for this layer): as rows
            # [tokens, in] when that is a view, else as it is (a copy would cost memory until the backward pass).
            rows = None
            if any(ctx.needs_input_grad[4 : 4 + count]):
                rows = x.view(-1, x.shape[-1]) if x.is_contiguous() else x
            ctx.save_for_backward(rows, None, *weights)
            return out
        # The input as rows in the dtype the matmul runs in (cast once, here, not again inside F.linear by
        # autocast), kept for the LoRA's gradients; the LoRA weights cast once too, kept for the backward pass.
        rows = _cast(_rows(x), _compute_dtype(x))  # [tokens, in]
        flat = F.linear(rows, weight, bias)  # [tokens, sum(out_i)]
        dtype = flat.dtype
        rows = _cast(rows, dtype)  # (a no-op unless autocast ran in a dtype `_compute_dtype` did not know)
        downs = [_cast(_matrix(d), dtype) for d in downs]  # [rank_i, in]
        ups = [_cast(_matrix(u), dtype) for u in ups]  # [out_i, rank_i]
        h = torch.mm(rows, _joined(downs).t())  # [tokens, sum(rank_i)]
        for part, up, scale, h_part in zip(
            _columns(flat, ctx.sizes, adapted), ups, scales, _split(h, [d.shape[0] for d in downs])
        ):
            part.addmm_(h_part, up.t(), alpha=scale)
        ctx.shapes = [p.shape for p in params[len(params) - 2 * terms :]]  # of the downs and ups, for their gradients
        ctx.save_for_backward(rows, h, *weights, *downs, *ups)
        return flat.view(*x.shape[:-1], flat.shape[1])  # [..., sum(out_i)]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, h, *params = ctx.saved_tensors
        count, terms = ctx.count, len(ctx.adapted)
        weights, downs, ups = params[:count], params[count : count + terms], params[count + terms :]
        needs = ctx.needs_input_grad
        first_bias = 4 + count
        first_down = first_bias + (count if ctx.has_bias else 0)
        flat = _rows(grad)  # [tokens, sum(out_i)]
        grad_x = None
        if needs[0]:
            weight = _cast(_joined([_matrix(w) for w in weights]), grad.dtype)
            grad_x = torch.mm(flat, weight)  # [tokens, in]
        grad_weights: list[Tensor | None] = [None] * count
        grad_biases: list[Tensor | None] = [None] * count if ctx.has_bias else []
        if any(needs[4:first_bias]):
            rows = rows if rows.dim() == 2 else _rows(rows)
            joint = torch.mm(flat.transpose(0, 1), _cast(rows, grad.dtype))  # [sum(out_i), in]
            parts = joint.split(ctx.sizes) if count > 1 else (joint,)
            grad_weights = [
                (g if g.dim() == w.dim() else g.view(w.shape)) if need else None
                for g, w, need in zip(parts, weights, needs[4:first_bias])
            ]
        if ctx.has_bias and any(needs[first_bias:first_down]):
            joint_bias = flat.sum(0)
            parts = joint_bias.split(ctx.sizes) if count > 1 else (joint_bias,)
            grad_biases = [g if need else None for g, need in zip(parts, needs[first_bias:first_down])]
        grad_downs: list[Tensor | None] = [None] * terms
        grad_ups: list[Tensor | None] = [None] * terms
        if terms:
            zero = grad.new_zeros(())  # addmm's input at beta 0: the products alone, scaled by alpha
            h_parts = _split(h, [d.shape[0] for d in downs])
            columns = _columns(flat, ctx.sizes, ctx.adapted)
            for j, (g, down, up, scale) in enumerate(zip(columns, downs, ups, ctx.scales)):
                gh = torch.mm(g, _cast(_matrix(up), grad.dtype))  # [tokens, rank_j]
                if grad_x is not None:
                    grad_x.addmm_(gh, _cast(_matrix(down), grad.dtype), alpha=scale)
                if needs[first_down + j]:
                    grad_down = torch.addmm(zero, gh.t(), rows, beta=0, alpha=scale)  # [rank_j, in]
                    shape = ctx.shapes[j]
                    grad_downs[j] = grad_down if len(shape) == 2 else grad_down.view(shape)
                if needs[first_down + terms + j]:
                    grad_up = torch.addmm(zero, g.t(), h_parts[j], beta=0, alpha=scale)  # [out_j, rank_j]
                    shape = ctx.shapes[terms + j]
                    grad_ups[j] = grad_up if len(shape) == 2 else grad_up.view(shape)
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[1])  # [..., in]
        return (grad_x, None, None, None, *grad_weights, *grad_biases, *grad_downs, *grad_ups)


def _columns(flat: Tensor, sizes: Sequence[int], adapted: Sequence[int]) -> list[Tensor]:
    """The columns [tokens, out_i] of `flat` [tokens, sum(out_i)] that belong to each layer in `adapted`."""
    if len(sizes) == 1:
        return [flat]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [flat[:, starts[i] : starts[i] + sizes[i]] for i in adapted]


def _split(t: Tensor, sizes: Sequence[int]) -> Sequence[Tensor]:
    """`t` [tokens, sum(sizes)] split along dim 1; one part as it is."""
    return (t,) if len(sizes) == 1 else t.split(list(sizes), dim=1)


def _records_grad(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> bool:
    """Whether autograd records a node for F.linear(x, weights, biases): grad mode on and something needs a gradient."""
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*weights, *biases)))


def _matrix(weight: Tensor) -> Tensor:
    """A Linear's weight [out, in] as it is; a 1x1 convolution's [out, in, 1, 1] viewed as [out, in]."""
    return weight if weight.dim() == 2 else weight.view(weight.shape[0], weight.shape[1])


def _rows(t: Tensor) -> Tensor:
    """[..., n] -> [rows, n]: a view when `t` is contiguous (one operator), else a reshape."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


def _joined(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors concatenated along dim 0; a single one as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype F.linear runs in for `x`: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        on = torch.is_autocast_enabled(device)
        return torch.get_autocast_dtype(device) if on and x.is_floating_point() else x.dtype
    if device == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    if device == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    return x.dtype


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
