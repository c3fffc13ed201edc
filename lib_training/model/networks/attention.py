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
from torch.utils.checkpoint import checkpoint

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

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        q, k, v = (
            rearrange(proj(inp), "b n (h d) -> b h n d", h=self.heads)
            for proj, inp in ((self.to_q, x), (self.to_k, source), (self.to_v, source))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, dim_head], scaled by dim_head^-0.5
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Linear projection to twice the width; one half gates the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: dim -> mult * dim (gated) -> dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
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

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], context [B, M, context_dim] -> [B, C, H, W]."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x
