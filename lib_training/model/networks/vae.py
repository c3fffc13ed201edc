"""The Stable Diffusion VAE (KL-regularised autoencoder, 8x downsampling) in the original LDM layout.

SD1, SD2 and SDXL share one structure (`VAEConfig.sd()`); only the weights and the latent scale
differ. Parameter names match the `first_stage_model.` part of an LDM checkpoint without that
prefix, so such a state dict loads strictly (after `normalize_vae_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lib_training.errors import CheckpointError, ConfigError
from lib_training.model.diffusion import LatentDistribution

GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

# Training-time keys found next to the VAE in some LDM files (discriminator/LPIPS loss, EMA counters).
_TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")
_ATTN_WEIGHT = re.compile(r"(^|\.)mid\.attn_1\.(q|k|v|proj_out)\.weight$")


@dataclass(frozen=True)
class VAEConfig:
    """Structure of an LDM `AutoencoderKL`, with the names of LDM's `ddconfig` (plus `embed_dim`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4

    def __post_init__(self) -> None:
        widths = [self.ch * mult for mult in self.ch_mult]
        if not widths or any(width <= 0 or width % GROUPS for width in widths):
            raise ConfigError(
                f"VAE channel widths {widths} (ch {self.ch} × ch_mult {self.ch_mult}) must be positive "
                f"multiples of {GROUPS}, the GroupNorm group count"
            )
        if self.num_res_blocks < 1:
            raise ConfigError(f"VAE num_res_blocks must be at least 1, not {self.num_res_blocks}")

    @classmethod
    def sd(cls) -> VAEConfig:
        """The VAE of SD1, SD2 and SDXL (83.7M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A small VAE with the real block structure and 8x downsampling, for tests and demos."""
        return cls(ch=32)

    @property
    def downsampling(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    def ldm_params(self) -> dict[str, Any]:
        """LDM's `ddconfig` dict for this structure (the VAE's `embed_dim` sits beside it in LDM configs)."""
        return {
            "double_z": True,
            "z_channels": self.z_channels,
            "resolution": 256,
            "in_channels": self.in_channels,
            "out_ch": self.out_channels,
            "ch": self.ch,
            "ch_mult": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": [],
            "dropout": 0.0,
        }


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv3x3, twice, plus a (1x1-projected when widths differ) skip connection."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections and a skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]; SDPA picks a memory-efficient kernel
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding right and bottom only (as LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Resnet → attention → resnet at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """The resnet blocks of one resolution; `downsample` (encoder) or `upsample` (decoder) when present."""

    def __init__(self, widths: list[tuple[int, int]], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in, c_out) for c_in, c_out in widths)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """images [B, in, H, W] -> moments [B, 2 * z, H / f, W / f] (mean and logvar stacked on channels)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * mult for mult in config.ch_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = config.ch
        for i, c_out in enumerate(widths):
            blocks = [(c_in if j == 0 else c_out, c_out) for j in range(config.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(c_out), "downsample"))
            c_in = c_out
        self.mid = MidBlock(c_in)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latents [B, z, h, w] -> images [B, out, f * h, f * w].

    `up[i]` is the level of resolution i (up.0 the highest), stored in that order as LDM does,
    although the decoder runs them from the last to the first.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * mult for mult in config.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, c_in, 3, padding=1)
        self.mid = MidBlock(c_in)
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            blocks = [(c_in if j == 0 else c_out, c_out) for j in range(config.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, Upsample(c_out) if i > 0 else None, "upsample"))
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The SD VAE; satisfies `lib_training.model.diffusion.VAE`. Computes in the dtype of its weights."""

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or VAEConfig.sd()
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, images: Tensor) -> LatentDistribution:
        """images [B, 3, H, W] in [-1, 1] -> distribution over unscaled latents [B, embed_dim, H/8, W/8]."""
        moments = self.quant_conv(self.encoder(images.to(self.dtype)))  # [B, 2 * embed_dim, h, w]
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(*LOGVAR_RANGE))

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents.to(self.dtype)))


def normalize_vae_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bring an LDM-layout VAE state dict (without the `first_stage_model.` prefix) to our exact layout.

    - Mid-block attention `q`, `k`, `v`, `proj_out` weights stored as Linear [C, C] (VAEs converted
      back from diffusers) or Conv1d [C, C, 1] are reshaped to the 1x1-conv layout [C, C, 1, 1].
    - Training-only entries (`loss.*` discriminator/LPIPS weights, `model_ema.*` counters) are dropped.

    Returns a new dict; the tensors are shared, not copied.
    """
    result: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(_TRAINING_ONLY_PREFIXES):
            continue
        if _ATTN_WEIGHT.search(key) and tensor.ndim in (2, 3):
            tensor = tensor.reshape(*tensor.shape[:2], 1, 1)
        result[key] = tensor
    return result


def vae_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    """Infer the structure of an LDM VAE from its state dict's key names and shapes.

    `shapes` maps keys WITHOUT the `first_stage_model.` prefix to tensor shapes. Training-only keys
    and 2-D attention weights are accepted (see `normalize_vae_state_dict`). Raises `CheckpointError`
    unless the keys and shapes are exactly those of an LDM VAE.
    """
    shapes = {key: tuple(shape) for key, shape in shapes.items() if not key.startswith(_TRAINING_ONLY_PREFIXES)}
    _check_is_ldm_vae(shapes)
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
        levels += 1
    num_res_blocks = 0
    while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in shapes:
        num_res_blocks += 1
    try:
        config = VAEConfig(
            in_channels=in_channels,
            out_channels=shapes["decoder.conv_out.weight"][0],
            ch=ch,
            ch_mult=tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)),
            num_res_blocks=num_res_blocks,
            z_channels=shapes["decoder.conv_in.weight"][1],
            embed_dim=shapes["post_quant_conv.weight"][1],
        )
    except ConfigError as error:
        raise CheckpointError(f"the VAE weights have an unsupported structure: {error}") from error
    _check_shapes_match(config, shapes)
    return config


_REQUIRED_KEYS = (
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.conv1.weight",
    "decoder.conv_in.weight",
    "decoder.conv_out.weight",
    "post_quant_conv.weight",
)


def _check_is_ldm_vae(shapes: Mapping[str, tuple[int, ...]]) -> None:
    missing = [key for key in _REQUIRED_KEYS if key not in shapes]
    if not missing:
        return
    if any(key.startswith("first_stage_model.") for key in shapes):
        hint = "the keys still carry the `first_stage_model.` prefix; strip it first"
    elif any(".down_blocks." in key or ".up_blocks." in key for key in shapes):
        hint = "this looks like a VAE in the diffusers layout; use one in the original (LDM) layout"
    else:
        sample = ", ".join(sorted(shapes)[:3]) or "no keys at all"
        hint = f"found keys such as {sample}; use a Stable Diffusion VAE file or a full checkpoint"
    raise CheckpointError(f"these weights are not a Stable Diffusion VAE (missing {missing[0]}): {hint}")


def _check_shapes_match(config: VAEConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in AutoencoderKL(config).state_dict().items()}
    found = {
        key: (*shape[:2], 1, 1) if _ATTN_WEIGHT.search(key) and len(shape) in (2, 3) else shape
        for key, shape in shapes.items()
    }
    problems = [f"missing {key}" for key in expected if key not in found]
    problems += [f"unexpected {key}" for key in found if key not in expected]
    problems += [
        f"{key} has shape {list(found[key])}, expected {list(shape)}"
        for key, shape in expected.items()
        if key in found and found[key] != shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"the VAE weights do not match the LDM VAE structure they appear to have: "
            f"{'; '.join(problems[:3])}{more}. The file may be damaged or a different kind of autoencoder"
        )
