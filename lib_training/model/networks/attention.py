"""The spatial transformer of the Stable Diffusion UNet, with LDM's parameter names.

`SpatialTransformer` turns a feature map into a sequence of tokens, runs `BasicTransformerBlock`s on
it (self-attention, cross-attention on the text context, gated feed-forward) and adds the result back
to the feature map. Every residual add is out of place, so autograd works when a host or a training
method wraps any of these modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lib_training.model.checkpointing import checkpoint
from lib_training.model.networks.fused import fusable, joint_linear, linear, runs_on_tokens

TRANSFORMER_NORM_EPS = 1e-6  # the GroupNorm in front of every SpatialTransformer


class CrossAttention(nn.Module):
    """Multi-head attention of `x` [B, N, query_dim] over `context` [B, M, context_dim] (itself when None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        source_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(source_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(source_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, kv: Tensor | None = None) -> Tensor:
        """x [B, N, query_dim] -> [B, N, query_dim]; `kv` [B, M, 2 * heads * dim_head]: to_k(context)
        and to_v(context) side by side, computed by the UNet for all cross-attentions at once."""
        if kv is not None:
            q = linear(self.to_q, x).view(*x.shape[:-1], self.heads, -1).transpose(1, 2)
            k, v = kv.view(*kv.shape[:-1], 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self._project(x, context)  # [B, heads, N or M, dim_head] each
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, dim_head], scaled by dim_head^-0.5
        return run_sequential(self.to_out, out.transpose(1, 2).reshape(*x.shape[:-1], -1))  # [B, N, heads * dim_head]

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, heads, tokens, dim_head]: one matmul for q, k and v in self-attention and one
        for k and v in cross-attention, unless a projection is overridden or hooked (then each runs
        as a module, so the override applies)."""
        heads = self.heads
        if context is None and fusable((self.to_q, self.to_k, self.to_v)):
            qkv = joint_linear(x, (self.to_q, self.to_k, self.to_v))  # [B, N, 3 * heads * dim_head]
            q, k, v = qkv.view(*qkv.shape[:-1], 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q = linear(self.to_q, x).view(*x.shape[:-1], heads, -1).transpose(1, 2)
        source = x if context is None else context
        if fusable((self.to_k, self.to_v)):
            kv = joint_linear(source, (self.to_k, self.to_v))  # [B, M, 2 * heads * dim_head]
            k, v = kv.view(*kv.shape[:-1], 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        k = linear(self.to_k, source).view(*source.shape[:-1], heads, -1).transpose(1, 2)
        v = linear(self.to_v, source).view(*source.shape[:-1], heads, -1).transpose(1, 2)
        return q, k, v


def run_sequential(layers: nn.Sequential, x: Tensor) -> Tensor:
    """`layers(x)`, skipping dropouts that cannot change anything (p = 0 or eval mode) and nothing hooks,
    and running Linear layers as one autograd node each (`fused.linear`)."""
    if hooked(layers):
        return layers(x)
    for layer in layers:
        if type(layer) is nn.Dropout and (layer.p == 0 or not layer.training) and not hooked(layer):
            continue
        x = linear(layer, x) if type(layer) is nn.Linear else layer(x)
    return x


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def hooked(module: nn.Module) -> bool:
    """Whether a forward override (on the instance) or a forward hook is on `module`."""
    return "forward" in module.__dict__ or bool(module._forward_hooks or module._forward_pre_hooks)


class GEGLU(nn.Module):
    """Linear projection to twice the width; one half gates the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = linear(self.proj, x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: dim -> mult * dim (gated) -> dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return run_sequential(self.net, x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block on tokens [B, N, dim]: self-attention, cross-attention on the context, feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, kv: Tensor | None = None) -> Tensor:
        """x [B, N, dim]; `kv`: attn2's keys and values, precomputed (see CrossAttention)."""
        x = x + self.attn1(self.norm1(x))
        x = x + (self.attn2(self.norm2(x), context) if kv is None else self.attn2(self.norm2(x), context, kv=kv))
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map [B, C, H, W], added back to it.

    `use_linear` selects Linear projections into and out of the token width (SD2, SDXL) instead of
    1x1 convolutions (SD1); the two are applied on opposite sides of the reshape to tokens, as in LDM.
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.gradient_checkpointing = False
        self.level = 0  # resolution level in the UNet (set by it), for selective checkpointing
        self.norm = nn.GroupNorm(32, in_channels, eps=TRANSFORMER_NORM_EPS)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
            self.proj_out: nn.Module = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor | None = None, kv: dict[nn.Module, Tensor] | None = None) -> Tensor:
        """x [B, C, H, W], context [B, M, context_dim] -> [B, C, H, W].

        `kv` maps transformer blocks to their cross-attention's keys and values, precomputed by the
        UNet (blocks missing from it compute their own).
        """
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, kv, use_reentrant=False)
        return self._forward(x, context, kv)

    def _forward(self, x: Tensor, context: Tensor | None, kv: dict[nn.Module, Tensor] | None = None) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        # SD1's 1x1 convolutions run as the Linear layers they are, on tokens (one matmul each, where a
        # convolution in NCHW costs layout conversions on a GPU and an im2col on the CPU), unless a
        # LoRA or hook overrides them: then they run as convolutions, on the feature map.
        tokens_in, tokens_out = runs_on_tokens(self.proj_in), runs_on_tokens(self.proj_out)
        if not tokens_in:
            h = self.proj_in(h)
        # One copy into token-major order here, instead of one in every LayerNorm (forward and backward)
        # of a residual stream that would keep the feature map's strides; free in channels-last.
        h = rearrange(h, "b c h w -> b (h w) c").contiguous()
        if tokens_in:
            h = linear(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context) if kv is None or block not in kv else block(h, context, kv=kv[block])
        if tokens_out:
            h = linear(self.proj_out, h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        h = h.contiguous(memory_format=memory_format_of(x))  # back to the layout the convolutions use
        if not tokens_out:
            h = self.proj_out(h)
        return h + x
