"""The Stable Diffusion UNet (SD1, SD2, SDXL) in the original LDM layout.

Module and parameter names are those of LDM's and SGM's `openaimodel.UNetModel`, so a checkpoint's
`model.diffusion_model.*` tensors load into `UNetModel` as they are:

- `time_embed.0/.2`: MLP on the sinusoidal timestep embedding; `label_emb.0.0/.0.2`: MLP on SDXL's
  vector y, added to the time embedding.
- `input_blocks.0.0`: the input convolution; then per resolution level `num_res_blocks` blocks
  `input_blocks.N` = ResBlock `.0` (+ SpatialTransformer `.1`), and between levels a Downsample
  `input_blocks.N.0.op`.
- `middle_block.0/1/2`: ResBlock, SpatialTransformer, ResBlock.
- `output_blocks.N`, deepest level first, `num_res_blocks + 1` per level: ResBlock `.0` on the
  features concatenated with the matching input block's output (+ SpatialTransformer `.1`), and
  at the end of each level but the last an Upsample `.1.conv` or `.2.conv`.
- `out.0` GroupNorm, `out.2` the output convolution.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_training.errors import CheckpointError
from lib_training.formats.family import Arch
from lib_training.model.checkpointing import checkpoint
from lib_training.model.networks.attention import (
    BasicTransformerBlock,
    CrossAttention,
    SpatialTransformer,
    hooked,
    run_sequential,
)
from lib_training.model.networks.fused import fusable, joint_linear
from lib_training.model.networks.timestep import timestep_embedding

SD1_NUM_HEADS = 8  # SD1 fixes the number of heads; SD2 and SDXL fix their width instead
SD2_HEAD_CHANNELS = 64


@dataclass(frozen=True)
class UNetConfig:
    """The hyper-parameters of a UNet, named as in LDM/SGM configs.

    `transformer_depth` gives, per resolution level, the number of transformer blocks in each
    SpatialTransformer of that level (0: no attention there); output blocks use the depth of the
    input blocks of the same level. Exactly one of `num_heads` (SD1) and `num_head_channels`
    (SD2, SDXL) is set, the other is -1. `adm_in_channels` is the width of SDXL's vector y.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    num_heads: int = -1
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels (the other stays -1)")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per level of channel_mult")
        if self.transformer_depth_middle < 1:
            raise ValueError("the middle block always has a transformer: transformer_depth_middle >= 1")

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls(num_heads=SD1_NUM_HEADS)

    @classmethod
    def sd21(cls) -> UNetConfig:
        return cls(context_dim=1024, num_head_channels=SD2_HEAD_CHANNELS, use_linear_in_transformer=True)

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        return cls(
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 10),
            transformer_depth_middle=10,
            context_dim=2048,
            num_head_channels=SD2_HEAD_CHANNELS,
            use_linear_in_transformer=True,
            adm_in_channels=2816,
        )

    @classmethod
    def tiny(cls, arch: Arch) -> UNetConfig:
        """A small UNet with the block structure of `arch`, for tests and demos."""
        if arch is Arch.SD1:
            return cls(model_channels=32, context_dim=128, num_heads=SD1_NUM_HEADS)
        if arch is Arch.SD2:
            return cls(
                model_channels=64,
                channel_mult=(1, 1, 2, 2),
                context_dim=128,
                num_head_channels=SD2_HEAD_CHANNELS,
                use_linear_in_transformer=True,
            )
        return cls(
            model_channels=64,
            channel_mult=(1, 1, 2),
            transformer_depth=(0, 1, 1),
            transformer_depth_middle=1,
            context_dim=192,
            num_head_channels=SD2_HEAD_CHANNELS,
            use_linear_in_transformer=True,
            adm_in_channels=128 + 6 * 256,
        )

    # --- derived values ----------------------------------------------------------------------
    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, width of a head) of a SpatialTransformer on `channels` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    def ldm_params(self) -> dict[str, Any]:
        """The `params` of `unet_config` (LDM yaml) or `network_config` (SGM yaml) describing this UNet.

        A depth that is the same at every attention level and in the middle is written as LDM's
        scalar; otherwise it is SGM's per-level list (levels without attention get 0 there, which SGM
        ignores as they are missing from `attention_resolutions`).
        """
        attention_levels = [level for level, depth in enumerate(self.transformer_depth) if depth > 0]
        params: dict[str, Any] = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "model_channels": self.model_channels,
            "attention_resolutions": [2**level for level in reversed(attention_levels)],
            "num_res_blocks": self.num_res_blocks,
            "channel_mult": list(self.channel_mult),
            "use_spatial_transformer": True,
            "use_linear_in_transformer": self.use_linear_in_transformer,
            "context_dim": self.context_dim,
            "legacy": False,
        }
        if self.num_heads != -1:
            params["num_heads"] = self.num_heads
        else:
            params["num_head_channels"] = self.num_head_channels
        depths = {self.transformer_depth[level] for level in attention_levels} | {self.transformer_depth_middle}
        if len(depths) == 1:
            params["transformer_depth"] = self.transformer_depth_middle
        else:
            params["transformer_depth"] = list(self.transformer_depth)
            if self.transformer_depth_middle != self.transformer_depth[-1]:
                params["transformer_depth_middle"] = self.transformer_depth_middle
        if self.adm_in_channels is not None:
            params["num_classes"] = "sequential"
            params["adm_in_channels"] = self.adm_in_channels
        return params


# --- building blocks -----------------------------------------------------------------------------
def cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor.to(dtype)` without dispatching an operator when it already has that dtype."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed with float32 statistics whatever the weights' dtype (as LDM's)."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)  # eps 1e-5

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            # torch's group_norm accumulates in float32 for half inputs, and autocast runs it in float32:
            # no casts needed (diffusers does the same).
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight, bias = self.weight.float(), None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added in between, plus a skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.level = 0  # resolution level in the UNet (set by it), for selective checkpointing
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, emb_out: Tensor | None = None) -> Tensor:
        """x [B, C_in, H, W], emb [B, E] -> [B, C_out, H, W].

        `emb_out` [B, C_out] is `emb_layers(emb)` when the UNet computed it already (for all ResBlocks at once).
        """
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, emb_out, use_reentrant=False)
        return self._forward(x, emb, emb_out)

    def _forward(self, x: Tensor, emb: Tensor, emb_out: Tensor | None = None) -> Tensor:
        h = run_sequential(self.in_layers, x)
        e = self.emb_layers(emb) if emb_out is None else emb_out  # [B, C_out]
        h = h + cast(e, h.dtype).view(*e.shape, 1, 1)
        h = run_sequential(self.out_layers, h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), then a 3x3 convolution.

    `size` overrides the doubling, so that a latent whose side is not divisible by the UNet's
    total downsampling (any multiple of 8 pixels) comes back to the size of its skip connection.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A sequence of layers that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None = None,
        size: tuple[int, int] | None = None,
        shared: SharedProjections | None = None,
    ) -> Tensor:
        shared = shared or SharedProjections({}, {})
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb) if layer not in shared.emb else layer(x, emb, shared.emb[layer])
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context) if layer not in shared.kv else layer(x, context, shared.kv[layer])
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class SharedProjections:
    """Projections that many blocks make of the same input, computed by the UNet with one matmul each.

    Every ResBlock projects the same time embedding (`emb_layers`: SiLU, Linear), and every
    cross-attention projects the same text context to keys and values. Only blocks that nothing
    overrides or hooks (down to the Linear layers) take part; the others compute their own.
    """

    emb: dict[nn.Module, Tensor]  # ResBlock -> emb_layers(emb) [B, C_out]
    kv: dict[nn.Module, dict[nn.Module, Tensor]]  # SpatialTransformer -> {block: [B, M, 2 * inner]}

    @classmethod
    def compute(cls, unet: UNetModel, emb: Tensor, context: Tensor) -> SharedProjections:
        resblocks = [m for m in unet.resblocks if _plain_emb_layers(m)]
        shared = cls({}, {})
        if len(resblocks) > 1:
            linears = [m.emb_layers[1] for m in resblocks]
            outs = joint_linear(F.silu(emb), linears).split([lin.weight.shape[0] for lin in linears], dim=-1)
            shared.emb = dict(zip(resblocks, outs))
        blocks = [
            (st, block)
            for st in unet.transformers
            if runs_own_forward(st, SpatialTransformer) and not hooked(st.transformer_blocks)
            for block in st.transformer_blocks
            if runs_own_forward(block, BasicTransformerBlock)
            and runs_own_forward(block.attn2, CrossAttention)
            and fusable((block.attn2.to_k, block.attn2.to_v))
        ]
        if len(blocks) > 1:
            linears = [lin for _, block in blocks for lin in (block.attn2.to_k, block.attn2.to_v)]
            if fusable(linears):
                sizes = [block.attn2.to_k.weight.shape[0] + block.attn2.to_v.weight.shape[0] for _, block in blocks]
                outs = joint_linear(context, linears).split(sizes, dim=-1)
                for (st, block), kv in zip(blocks, outs):
                    shared.kv.setdefault(st, {})[block] = kv
        return shared


def _set_level(layers: Iterable[nn.Module], level: int) -> None:
    """Note the resolution level (0: full latent resolution) on ResBlocks and SpatialTransformers."""
    for layer in layers:
        if isinstance(layer, (ResBlock, SpatialTransformer)):
            layer.level = level


def runs_own_forward(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling `module` runs `cls.forward` (the signature that takes precomputed projections):
    no instance override or hook, and no subclass (a host's) with a forward of its own."""
    return type(module).forward is cls.forward and not hooked(module)


def _plain_emb_layers(block: ResBlock) -> bool:
    layers = block.emb_layers
    return (
        runs_own_forward(block, ResBlock)
        and not hooked(layers)
        and len(layers) == 2
        and type(layers[0]) is nn.SiLU
        and not hooked(layers[0])
        and fusable((layers[1], layers[1]))
    )


# --- the model -----------------------------------------------------------------------------------
class UNetModel(nn.Module):
    """The denoising UNet: x_t [B, in, h, w], timesteps [B], context [B, M, context_dim] -> [B, out, h, w]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = config.time_embed_dim

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            heads, dim_head = config.heads(channels)
            return SpatialTransformer(
                channels, heads, dim_head, depth, config.context_dim, config.use_linear_in_transformer
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb: nn.Sequential | None = None
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]  # channels of every input block's output, consumed by the output blocks
        ch = mc
        last_level = len(config.channel_mult) - 1
        for level, (mult, depth) in enumerate(zip(config.channel_mult, config.transformer_depth)):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult)]
                ch = mc * mult
                if depth > 0:
                    layers.append(transformer(ch, depth))
                _set_level(layers, level)
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepSequential(
            ResBlock(ch, emb_dim, ch),
            transformer(ch, config.transformer_depth_middle),
            ResBlock(ch, emb_dim, ch),
        )
        _set_level(self.middle_block, last_level)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(config.channel_mult))):
            mult, depth = config.channel_mult[level], config.transformer_depth[level]
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level > 0 and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                _set_level(layers, level)
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1))
        # Plain lists (not registered again as submodules), for SharedProjections.
        self.__dict__["resblocks"] = [m for m in self.modules() if isinstance(m, ResBlock)]
        self.__dict__["transformers"] = [m for m in self.modules() if isinstance(m, SpatialTransformer)]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, which is also the compute dtype."""
        return self.time_embed[0].weight.dtype

    def set_gradient_checkpointing(self, enabled: bool, fraction: float = 1.0) -> None:
        """Recompute ResBlocks and SpatialTransformers in the backward pass (while grad is enabled).

        `fraction` of them (rounded up) are recomputed, those at the highest resolution first: their
        activations are the largest (channels x pixels falls by 2 per level down), so a fraction
        saves most of the memory for less of the recomputation.
        """
        blocks = sorted(
            (m for m in self.modules() if isinstance(m, (ResBlock, SpatialTransformer))), key=lambda m: m.level
        )  # stable: network order within a level
        chosen = math.ceil(max(0.0, min(1.0, fraction)) * len(blocks)) if enabled else 0
        for index, module in enumerate(blocks):
            module.gradient_checkpointing = index < chosen

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """x [B, in, h, w], timesteps [B] (int or float), context [B, M, context_dim], y [B, adm] (SDXL).

        Inputs are cast to the weights' dtype; the output [B, out, h, w] has that dtype.
        """
        if (y is None) != (self.label_emb is None):
            need = "needs" if self.label_emb is not None else "takes no"
            raise ValueError(f"this UNet {need} the vector conditioning y")
        dtype = self.dtype
        if timesteps.device != x.device:
            timesteps = timesteps.to(x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = run_sequential(
            self.time_embed, cast(timestep_embedding(timesteps, self.config.model_channels), dtype)
        )  # [B, E]
        if self.label_emb is not None and y is not None:
            emb = emb + self.label_emb(cast(y, dtype))
        context = cast(context, dtype)

        h = cast(x, dtype)
        shared = SharedProjections.compute(self, emb, context)
        skips: list[Tensor] = []
        for block in self.input_blocks:
            h = block(h, emb, context, shared=shared)
            skips.append(h)
        h = self.middle_block(h, emb, context, shared=shared)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None, shared=shared)
        return self.out(h)


# --- configuration from a state dict ---------------------------------------------------------------
_TRANSFORMER_BLOCK = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks\.(\d+)\.")
_LDM_PREFIX = "model.diffusion_model."


def unet_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], arch: Arch) -> UNetConfig:
    """Infer the config of a UNet from the names and shapes of its state dict.

    Keys are given without the checkpoint's `model.diffusion_model.` prefix.
    The number of heads is not visible in the shapes; it follows the family: SD1 has 8 heads,
    SD2 and SDXL 64 channels per head.
    """

    def fail(problem: str) -> CheckpointError:
        hint = ""
        if any(key.startswith(_LDM_PREFIX) for key in shapes):
            hint = f" (the keys still carry the {_LDM_PREFIX!r} prefix; strip it first)"
        return CheckpointError(f"not a Stable Diffusion UNet in the LDM layout: {problem}{hint}")

    def shape_of(key: str, ndim: int) -> tuple[int, ...]:
        shape = shapes.get(key)
        if shape is None:
            raise fail(f"{key!r} is missing")
        if len(shape) != ndim:
            raise fail(f"{key!r} has shape {tuple(shape)}, expected {ndim} dimensions")
        return tuple(shape)

    model_channels, in_channels = shape_of("input_blocks.0.0.weight", 4)[:2]
    out_channels = shape_of("out.2.weight", 4)[0]
    time_embed = shape_of("time_embed.0.weight", 2)
    if time_embed != (4 * model_channels, model_channels):
        raise fail(f"time_embed.0.weight has shape {time_embed}, expected {(4 * model_channels, model_channels)}")

    # Input blocks after the first: ResBlocks (grouped by level) and the Downsamples between levels.
    levels: list[list[int]] = [[]]
    index = 1
    while True:
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{index}.0.in_layers.2.weight" in shapes:
            levels[-1].append(index)
        else:
            break
        index += 1
    res_blocks = {len(blocks) for blocks in levels}
    if len(res_blocks) != 1 or 0 in res_blocks:
        raise fail(f"expected the same number of ResBlocks at every level, found {[len(b) for b in levels]}")
    num_res_blocks = res_blocks.pop()

    depths: dict[str, int] = {}  # block prefix -> number of transformer blocks
    for key in shapes:
        match = _TRANSFORMER_BLOCK.match(key)
        if match:
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)

    channel_mult: list[int] = []
    transformer_depth: list[int] = []
    for level, blocks in enumerate(levels):
        widths = {shape_of(f"input_blocks.{n}.0.in_layers.2.weight", 4)[0] for n in blocks}
        level_depths = {depths.get(f"input_blocks.{n}", 0) for n in blocks}
        if len(widths) != 1 or len(level_depths) != 1:
            raise fail(f"the ResBlocks or transformers of level {level} differ from each other")
        width = widths.pop()
        if width % model_channels:
            raise fail(f"level {level} has {width} channels, not a multiple of {model_channels}")
        channel_mult.append(width // model_channels)
        transformer_depth.append(level_depths.pop())

    last_output = len(levels) * (num_res_blocks + 1) - 1
    if f"output_blocks.{last_output}.0.in_layers.2.weight" not in shapes:
        raise fail(f"output_blocks.{last_output} is missing")
    middle_depth = depths.get("middle_block", 0)
    if middle_depth == 0:
        raise fail("middle_block.1 has no transformer blocks")

    to_k = next((shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    if to_k is None or len(to_k) != 2:
        raise fail("no cross-attention (attn2.to_k.weight) found")
    proj_in = shapes.get("middle_block.1.proj_in.weight")
    if proj_in is None or len(proj_in) not in (2, 4):
        raise fail("middle_block.1.proj_in.weight is missing or is neither a Linear nor a 1x1 Conv2d")
    label_emb = shapes.get("label_emb.0.0.weight")

    heads = {"num_heads": SD1_NUM_HEADS} if arch is Arch.SD1 else {"num_head_channels": SD2_HEAD_CHANNELS}
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(transformer_depth),
        transformer_depth_middle=middle_depth,
        context_dim=to_k[1],
        use_linear_in_transformer=len(proj_in) == 2,
        adm_in_channels=None if label_emb is None else label_emb[1],
        **heads,
    )
