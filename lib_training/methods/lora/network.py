"""LoRA, LoCon and DoRA modules: low-rank updates of frozen layers, as kohya and LyCORIS define them.

A module adapts one weight W: [out, in] of a Linear, [out, in, kh, kw] of a Conv2d, or the rows of
an nn.MultiheadAttention's fused q/k/v `in_proj_weight` [3W, W] that belong to one of q, k, v:

    ΔW = (alpha / rank) · up @ down       up [out, rank] (conv: [out, rank, 1, 1]),
                                          down [rank, in] (conv: [rank, in, kh, kw])

Plain LoRA / LoCon at multiplier m: y = layer(x) + m · ΔW x, computed on the activations
(`up(down(x))`), never by forming ΔW. DoRA adds a magnitude `dora_scale` d. Training makes it [1, in(, 1, 1)],
one value per input channel, the layout A1111 (`network.py`) and ComfyUI (`weight_adapter/base.py`) read:

    W_dora = d ⊙ (W + ΔW) / ‖W + ΔW‖        the norm per input channel (over output rows and kernel)
    W'     = W + m · (W_dora − W)             (`lib_training.merge.dora`, which the merge tools share)

d starts as ‖W‖, so W' = W before training, as ΔW = 0 (up starts at zero, down kaiming-uniform). A file may
also hold d per output channel, [out, 1(, 1, 1)] (LyCORIS' `wd_on_out`); it applies as ComfyUI applies it,
W_dora = d ⊙ (W + ΔW) / ‖W‖ per output row (`lib_training.merge.dora` says which layout is which).
DoRA layers add (W' − W) x to the layer's output, with d per input channel computed on the activations
(`LowRankModule.dora_on_activations`: no weight-sized tensor kept for the backward pass); the fused
attention of open_clip text encoders runs on its adapted weights (the changes of every attached LoRA
summed, as A1111 and ComfyUI stack them).

Dropout, as kohya's `networks/lora.py` has it, only while training: `dropout` drops elements of
down(x), `rank_dropout` whole ranks per sample (the rest scaled up), `module_dropout` skips a module
in a forward pass. It draws from the network's own generator, so a resumed run draws the same numbers. On
layers that run on W' (DoRA, fused q/k/v) only `module_dropout` applies. While a network with dropout is
attached, gradient checkpointing replays its generator (`lib_training.model.checkpointing`): the
recomputed forward draws the masks of the first one.

A plain LoRA (no dropout, not DoRA) on a Linear or 1x1 Conv2d that nothing else overrides marks its
forward with its term (`model.networks.fused.mark_low_rank`): the UNet's fused paths then compute the
layer and the term as one autograd node (q/k/v still as one matmul), the result of this forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_training.merge.dora import dora_change, input_norm, on_output_axis
from lib_training.model.checkpointing import replaying
from lib_training.model.hooks import ModuleHooks
from lib_training.model.networks.fused import LowRank, mark_low_rank


@dataclass(frozen=True)
class Dropout:
    """Dropout probabilities of a network while it trains (all 0 at generation time)."""

    neuron: float = 0.0
    rank: float = 0.0
    module: float = 0.0


class LowRankModule(nn.Module):
    """One adapted weight: `down`, `up`, `alpha` and (DoRA) `dora_scale`; see the module docstring."""

    def __init__(
        self,
        weight_shape: Sequence[int],
        rank: int,
        alpha: float,
        *,
        conv: dict[str, Any] | None = None,
        dora_from: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features, *kernel = (int(s) for s in weight_shape)
        self.weight_shape = (out_features, in_features, *kernel)
        self.conv = conv  # stride / padding / dilation of the adapted Conv2d; None for Linear (and q/k/v rows)
        self.alpha = float(alpha)
        down = torch.empty(rank, in_features, *kernel)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(out_features, rank, *([1, 1] if kernel else [])))
        self.dora_scale = None if dora_from is None else nn.Parameter(input_norm(dora_from))

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """ΔW = scale · up @ down, fp32, shaped like the weight."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(self.weight_shape) * self.scale

    def weight_delta(self, weight: Tensor, multiplier: float) -> Tensor:
        """W' − W for the weight W this module adapts (in W's dtype): m · ΔW, or DoRA's m · (W_dora − W)."""
        if self.dora_scale is None:
            return (multiplier * self.delta()).to(weight.dtype)
        return dora_change(weight, self.delta(), self.dora_scale, multiplier).to(weight.dtype)

    def adapted_weight(self, weight: Tensor, multiplier: float) -> Tensor:
        """W' for the weight W this module adapts (in W's dtype)."""
        return weight + self.weight_delta(weight, multiplier)

    def input_scale(self, weight: Tensor) -> Tensor:
        """DoRA's s = d / ‖W + ΔW‖ per input channel, [in], fp32, from low-rank products only: with W, A = down
        and B = up seen as [out, in, k] / [r, in, k] / [out, r] (k: kernel positions) and c = alpha / rank,
            ‖W + ΔW‖²_j = ‖W_j‖² + 2c · Σ_rk A[r,j,k] (BᵀW)[r,j,k] + c² · Σ_rk A[r,j,k] (BᵀB A)[r,j,k]
        so no tensor of W's size is kept for the backward pass (W, frozen, is kept as stored)."""
        out_features, in_features = self.weight_shape[:2]
        a = self.down.float().reshape(self.rank, in_features, -1)  # [r, in, k]
        b = self.up.float().reshape(out_features, self.rank)  # [out, r]
        w = weight.reshape(out_features, -1)  # [out, in·k], as stored
        with torch.no_grad():
            weight_sq = w.float().square().reshape(out_features, in_features, -1).sum(dim=(0, 2))  # [in]
        bw = _OnFrozen.apply(b.t(), w).reshape(a.shape)  # BᵀW [r, in, k]
        bba = torch.einsum("rs,sik->rik", b.t() @ b, a)  # [r, in, k]
        cross = (a * bw).sum(dim=(0, 2))  # [in]
        delta_sq = (a * bba).sum(dim=(0, 2))  # [in]
        norm = (weight_sq + 2 * self.scale * cross + self.scale**2 * delta_sq).clamp_min(0).sqrt()
        return self.dora_scale.float().flatten() / norm  # type: ignore[union-attr]

    def dora_on_activations(self, x: Tensor, weight: Tensor, multiplier: float) -> Tensor:
        """(W' − W) x for DoRA with d per input channel, on the activations: W_dora = (W + ΔW) · diag(s), so
            (W' − W) x = m · (W ((s − 1) ⊙ x) + ΔW (s ⊙ x))
        x [..., in] (Linear) or [B, in, H, W] (Conv2d, s per channel); `weight` is the layer's as stored (a host
        may keep it in fp16 and compute in x's dtype: it is cast for each product, the cast not kept)."""
        s = self.input_scale(weight)
        if self.conv is not None:
            s = s.reshape(1, -1, 1, 1)
        s = s.to(x.dtype)
        rest = x * (s - 1)
        if self.conv is not None:
            base = _OnFrozenConv.apply(rest, weight, self.conv)
        else:  # [..., in] @ Wᵀ [in, out]
            base = _OnFrozen.apply(rest.reshape(-1, rest.shape[-1]), weight.t()).reshape(*rest.shape[:-1], -1)
        return multiplier * (base + self.on_activations(x * s, 1.0, None, _NO_RNG))

    def on_activations(self, x: Tensor, multiplier: float, dropout: Dropout | None, rng: torch.Generator) -> Tensor:
        """m · ΔW x computed as up(down(x)): x [..., in] (Linear) or [B, in, H, W] (Conv2d)."""
        down = self.down.to(x.dtype)
        lx = F.linear(x, down) if self.conv is None else F.conv2d(x, down, **self.conv)  # [..., r] or [B, r, h, w]
        scale = self.scale * multiplier
        if dropout is not None and dropout.neuron > 0:
            keep = torch.rand(lx.shape, generator=rng, device=rng.device) >= dropout.neuron
            lx = lx * keep.to(lx) / (1 - dropout.neuron)
        if dropout is not None and dropout.rank > 0:
            rank_axis = 1 if self.conv is not None else lx.ndim - 1
            shape = [lx.shape[0] if lx.ndim > 1 else 1] + [1] * (lx.ndim - 1)
            shape[rank_axis] = self.rank
            keep = torch.rand(shape, generator=rng, device=rng.device) >= dropout.rank  # per sample and rank
            lx = lx * keep.to(lx)
            scale = scale / (1 - dropout.rank)
        up = self.up.to(x.dtype)
        y = F.linear(lx, up) if self.conv is None else F.conv2d(lx, up)
        return y * scale


_NO_RNG = torch.Generator()  # for `on_activations` without dropout, which draws nothing


class _OnFrozen(torch.autograd.Function):
    """a @ W in a's dtype for a frozen W [n, m] (any dtype): the backward pass keeps W as stored, not the
    cast copy autograd would keep (a whole fp32 copy of an fp16 model, on Forge)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, weight: Tensor) -> Tensor:  # a [p, n] -> [p, m]
        ctx.save_for_backward(weight)
        return a @ weight.to(a.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype).t(), None


class _OnFrozenConv(torch.autograd.Function):
    """conv2d(x, W) in x's dtype for a frozen kernel W [out, in, kh, kw], as `_OnFrozen` (no bias, groups 1)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, conv: dict[str, Any]) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.conv, ctx.input_shape = conv, x.shape
        return F.conv2d(x, weight.to(x.dtype), None, **conv)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(grad.dtype), grad, **ctx.conv)
        return grad_x, None, None


@dataclass
class Target:
    """Where a module goes: the live layer and, for fused q/k/v, which rows of its in_proj_weight."""

    name: str  # kohya name
    layer: nn.Module  # nn.Linear, nn.Conv2d or nn.MultiheadAttention
    rows: tuple[int, int] | None = None  # q, k or v: rows of the attention's in_proj_weight
    out_proj: bool = False  # the attention's out_proj (which nn.MultiheadAttention never calls as a module)


def weight_of(target: Target) -> Tensor:
    """The weight a target adapts: the layer's weight, or its rows of in_proj_weight."""
    if target.rows is not None:
        start, end = target.rows
        return target.layer.in_proj_weight[start:end]  # type: ignore[index]
    if target.out_proj:
        return target.layer.out_proj.weight  # type: ignore[union-attr,return-value]
    return target.layer.weight  # type: ignore[return-value]


def conv_args(layer: nn.Module) -> dict[str, Any] | None:
    if isinstance(layer, nn.Conv2d):
        return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    return None


class LoraNetwork(nn.Module):
    """The modules of one LoRA by kohya name, and their hooks on a model while attached.

    `multiplier` is the strength (1 while training); `dropout` applies while `training` is set.
    """

    def __init__(self, modules: dict[str, LowRankModule], targets: dict[str, Target], rng: torch.Generator) -> None:
        super().__init__()
        self.lora = nn.ModuleDict(modules)
        self.targets = targets
        self.rng = rng
        self.multiplier = 1.0
        self.dropout: Dropout | None = None
        self._hooks = ModuleHooks()
        self._replay = contextlib.ExitStack()  # holds the generator's registration for checkpointing

    @property
    def attached(self) -> bool:
        return len(self._hooks) > 0

    def attach(self) -> None:
        """Hook every module into its layer (once)."""
        if self.attached:
            return
        by_attention: dict[int, tuple[nn.MultiheadAttention, list[str]]] = {}
        for name, target in self.targets.items():
            if isinstance(target.layer, nn.MultiheadAttention):
                by_attention.setdefault(id(target.layer), (target.layer, []))[1].append(name)
            elif self.lora[name].dora_scale is not None:
                self._hooks.wrap_forward(target.layer, self._weight_forward(name))
            else:
                alone = "forward" not in target.layer.__dict__  # nothing else overrides the layer (yet)
                self._hooks.wrap_forward(target.layer, self._residual_forward(name))
                if alone:  # the fused paths may compute the layer and this term as one node
                    mark_low_rank(target.layer.forward, self._low_rank_term(name))
        for attention, names in by_attention.values():
            _ATTENTION_DELTAS.setdefault(id(attention), {})[id(self)] = self._attention_deltas(attention, names)
            self._hooks.wrap_forward(attention, self._attention_forward(attention))
        dropout = self.dropout
        if dropout is not None and (dropout.neuron > 0 or dropout.rank > 0 or dropout.module > 0):
            self._replay.enter_context(replaying(self.rng))

    def detach(self) -> None:
        for deltas in _ATTENTION_DELTAS.values():
            deltas.pop(id(self), None)
        for key in [key for key, deltas in _ATTENTION_DELTAS.items() if not deltas]:
            del _ATTENTION_DELTAS[key]
        self._hooks.clear()
        self._replay.close()

    # --- forwards ---------------------------------------------------------------------------------
    def _skipped(self) -> bool:
        dropout = self.dropout if self.training else None
        if dropout is None or dropout.module <= 0:
            return False
        return bool(torch.rand((), generator=self.rng, device=self.rng.device) < dropout.module)

    def _residual_forward(self, name: str):
        module = self.lora[name]

        def forward(inner, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = inner(x, *args, **kwargs)
            if self._skipped():
                return y
            dropout = self.dropout if self.training else None
            return y + module.on_activations(x, self.multiplier, dropout, self.rng).to(y.dtype)

        return forward

    def _low_rank_term(self, name: str):
        """The term `_residual_forward` adds, for the fused paths (`model.networks.fused`): None while
        any dropout is on (the masks are drawn here), when it must run as it is."""
        module = self.lora[name]

        def term() -> LowRank | None:
            dropout = self.dropout if self.training else None
            if dropout is not None and (dropout.neuron > 0 or dropout.rank > 0 or dropout.module > 0):
                return None
            return LowRank(module.down, module.up, module.scale * self.multiplier)

        return term

    def _weight_forward(self, name: str):
        """DoRA on a Linear / Conv2d: y = inner(x) + (W' − W) x, so it stacks with other hooks and LoRAs
        (each LoRA's change is taken against the original weight, as A1111 and ComfyUI sum them).
        A weight stored in another dtype than the input's is used in the input's, as the layer itself
        does (Forge keeps weights in fp16 and casts them to the computation's dtype)."""
        module, layer = self.lora[name], self.targets[name].layer

        def forward(inner, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = inner(x, *args, **kwargs)
            if self._skipped():
                return y
            weight: Tensor = layer.weight  # type: ignore[assignment]
            if not on_output_axis(module.dora_scale, weight):  # type: ignore[arg-type]
                return y + module.dora_on_activations(x, weight, self.multiplier).to(y.dtype)
            weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)
            delta = module.weight_delta(weight, self.multiplier)
            if isinstance(layer, nn.Conv2d):
                return y + layer._conv_forward(x, delta, None)
            return y + F.linear(x, delta)

        return forward

    def _attention_deltas(self, attention: nn.MultiheadAttention, names: list[str]):
        """This network's (Δin_proj [3W, W], Δout_proj [W, W]) for `attention`, against its own weights."""
        rows = {self.targets[n].rows: self.lora[n] for n in names if self.targets[n].rows is not None}
        out = [self.lora[n] for n in names if self.targets[n].out_proj]  # the out_proj, if adapted

        def deltas() -> tuple[Tensor, Tensor]:
            weight = attention.in_proj_weight  # [3W, W]
            blocks = []
            for start in range(0, weight.shape[0], attention.embed_dim):
                part = weight[start : start + attention.embed_dim]
                module = rows.get((start, start + attention.embed_dim))
                skip = module is None or self._skipped()
                blocks.append(torch.zeros_like(part) if skip else module.weight_delta(part, self.multiplier))  # type: ignore[union-attr]
            out_weight = attention.out_proj.weight
            if not out or self._skipped():
                return torch.cat(blocks), torch.zeros_like(out_weight)
            return torch.cat(blocks), out[0].weight_delta(out_weight, self.multiplier)

        return deltas

    def _attention_forward(self, attention: nn.MultiheadAttention):
        """The attention with adapted in/out projections. nn.MultiheadAttention reads its weights
        directly, so every attached network's changes of it are summed here (`_ATTENTION_DELTAS`) and
        the outermost wrapper runs the attention once with them all; the inner ones are not called."""

        def forward(inner, query: Tensor, key: Tensor, value: Tensor, **kwargs: Any):
            in_weight, out_weight = attention.in_proj_weight, attention.out_proj.weight
            for deltas in list(_ATTENTION_DELTAS.get(id(attention), {}).values()):
                d_in, d_out = deltas()
                in_weight, out_weight = in_weight + d_in, out_weight + d_out
            return _attention(attention, query, key, value, in_weight, out_weight, **kwargs)

        return forward


# id(attention) -> id(network) -> that network's deltas of it, for every attached network
_ATTENTION_DELTAS: dict[int, dict[int, Any]] = {}


def _attention(
    attention: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_weight: Tensor,
    out_weight: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention's forward with other in/out projection weights (no separate k/v dims)."""
    if attention.batch_first:  # [B, L, W] -> [L, B, W]
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query,
        key,
        value,
        attention.embed_dim,
        attention.num_heads,
        in_weight,
        attention.in_proj_bias,
        attention.bias_k,
        attention.bias_v,
        attention.add_zero_attn,
        attention.dropout,
        out_weight,
        attention.out_proj.bias,
        training=attention.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    return (out.transpose(0, 1) if attention.batch_first else out), weights
