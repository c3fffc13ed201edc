"""The tiny-world model: an SD1 checkpoint (LDM key names, 49408-token CLIP vocabulary) at tiny widths.

What is trained ships as fp16 tensors under `weights/` (the UNet in shards under 2 MB, the VAE);
the text encoder is never trained and is regenerated from `WORLD_SEED`, so none of its 6.9M
values (mostly the token table) are stored. `world_checkpoint()` assembles the single-file
checkpoint once in the cache, where every loader (our standalone app, the host stand-ins) reads it
like any other checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from lib_training.errors import UserError
from lib_training.formats.family import ModelFamily
from lib_training.formats.tensor_files import open_tensors, save_safetensors
from lib_training.model.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from lib_training.model.networks.unet import UNetConfig, UNetModel
from lib_training.model.networks.vae import AutoencoderKL, VAEConfig
from lib_training.model.standalone import StandaloneModel, assemble
from lib_training.model.tiny import randomize_weights
from lib_training.user_cache import cache_root

WORLD_SEED = 0
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHARD_BYTES = 1_900_000  # a shipped file stays under the project's 2 MB limit for files in git
CHECKPOINT_VERSION = "tiny-world-v4"
CHECKPOINT_NAME = "tiny-world-sd1.safetensors"


def unet_config() -> UNetConfig:
    """SD1's UNet structure (4 levels, attention on the first three, 8 heads) at width 64, one ResBlock a level.

    64 channels from the first level on, not 32, for the reason given for the VAE: with one channel
    per GroupNorm group, the last norm erases each channel's mean over the picture, and the UNet
    cannot predict the mean of the noise, which at high noise is what sets the picture's colours
    (a first UNet at width 32 denoised well at t=500 and sampled washed-out, all-light pictures)."""
    return UNetConfig(model_channels=64, channel_mult=(1, 1, 1, 1), num_res_blocks=1, context_dim=128, num_heads=8)


def vae_config() -> VAEConfig:
    """SD's VAE structure (8x downsampling, 4 latent channels) at width 64, one ResBlock a level.

    64 channels, not 32: with GroupNorm's 32 groups, 32 channels would be normalised one by one
    per picture, and the decoder's last norm would then erase how bright each channel is, so a
    picture's colours could not come back (the first VAE tried drew every colour grey-brown)."""
    return VAEConfig(ch=32, ch_mult=(2, 2, 2, 2), num_res_blocks=1)


def text_encoder(seed: int = WORLD_SEED) -> ClipTextEncoder:
    """The frozen random tiny CLIP-L of the world, its values rounded to fp16 (as they are stored)."""
    encoder = ClipTextEncoder(TextEncoderConfig.clip_l_sd1(tiny=True))
    randomize_weights(encoder, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for param in encoder.parameters():
            param.copy_(param.half().float())
    return encoder.requires_grad_(False).eval()


def build_world_model(
    unet_state: Mapping[str, Tensor] | None = None,
    vae_state: Mapping[str, Tensor] | None = None,
    seed: int = WORLD_SEED,
) -> StandaloneModel:
    """The world model in fp32 on the CPU: given UNet/VAE tensors, or seeded random ones where not given."""
    generator = torch.Generator().manual_seed(seed + 1)
    unet, vae = UNetModel(unet_config()), AutoencoderKL(vae_config())
    for module, state in ((unet, unet_state), (vae, vae_state)):
        if state is None:
            randomize_weights(module, generator)
        else:
            module.load_state_dict({k: v.float() for k, v in state.items()})
    model = assemble(
        ModelFamily.parse("sd1"), unet, vae, [text_encoder(seed)], device=torch.device("cpu"), dtype=torch.float32
    )
    model.metadata = {
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": "tiny world (SD1 structure, 64x64 pictures of coloured shapes)",
        "sdwt.tiny": "true",
        "sdwt.world_seed": str(seed),
    }
    return model


def save_shipped(name: str, state: Mapping[str, Tensor], folder: Path = WEIGHTS_DIR) -> list[Path]:
    """Write `state` in fp16 as `folder/NAME-K.safetensors` shards of at most SHARD_BYTES each."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{name}-*.safetensors"):
        old.unlink()
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        half = tensor.detach().to(torch.float16).contiguous()
        nbytes = half.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = half
        size += nbytes
    paths = []
    for index, shard in enumerate(shards):
        path = folder / f"{name}-{index}.safetensors"
        save_safetensors(path, shard, {"sdwt.part": name})
        paths.append(path)
    return paths


def load_shipped(name: str, folder: Path = WEIGHTS_DIR) -> dict[str, Tensor]:
    paths = sorted(folder.glob(f"{name}-*.safetensors"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not paths:
        raise UserError(f"no trained {name} weights in {folder}; run `python -m lib_training world pretrain` first")
    state: dict[str, Tensor] = {}
    for path in paths:
        with open_tensors(path) as source:
            state.update({key: source.get(key) for key in source.shapes()})
    return state


def shipped_model(folder: Path = WEIGHTS_DIR) -> StandaloneModel:
    """The pretrained world model, straight from the shipped tensors."""
    return build_world_model(load_shipped("unet", folder), load_shipped("vae", folder))


def world_checkpoint(root: Path | None = None) -> Path:
    """The pretrained world model as one SD1 checkpoint file in the cache (made on first use)."""
    folder = (root or cache_root()) / CHECKPOINT_VERSION
    path = folder / CHECKPOINT_NAME
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".world-", dir=folder))
    except OSError as error:
        raise UserError(
            f"cannot create {folder}: {error.strerror or error}. Set SDWT_CACHE to a writable folder."
        ) from error
    try:
        shipped_model().save(staging / CHECKPOINT_NAME, dtype=torch.float16)
        (staging / CHECKPOINT_NAME).replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
