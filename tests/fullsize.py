"""Full-size SD1.5, SD2.1 and SDXL-base models and checkpoints as the tests see them: built on the
meta device (real module trees, key names and shapes, no memory), once per family."""

from __future__ import annotations

import functools

import torch

from lib_training.formats.family import Arch, ModelFamily
from lib_training.model.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from lib_training.model.networks.unet import UNetConfig, UNetModel
from lib_training.model.networks.vae import AutoencoderKL, VAEConfig
from lib_training.model.standalone import StandaloneModel, assemble

UNET_PRESETS = {Arch.SD1: UNetConfig.sd15, Arch.SD2: UNetConfig.sd21, Arch.SDXL: UNetConfig.sdxl_base}


@functools.cache
def full_size_model(arch: Arch) -> StandaloneModel:
    """The family's full-size standalone model, fp16 on the meta device (the real module tree)."""
    with torch.device("meta"):
        modules = (UNetModel(UNET_PRESETS[arch]()), AutoencoderKL(VAEConfig.sd()))
        encoders = [ClipTextEncoder(c) for c in TextEncoderConfig.for_arch(arch)]
    return assemble(ModelFamily(arch), *modules, encoders, device=torch.device("meta"), dtype=torch.float16)


@functools.cache
def full_size_checkpoint(arch: Arch) -> dict[str, torch.Tensor]:
    """Checkpoint key -> meta tensor (fp16) of the family's full-size model."""
    return full_size_model(arch).checkpoint_state_dict()


@functools.cache
def full_size_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of the family's full-size model."""
    return {key: tuple(tensor.shape) for key, tensor in full_size_checkpoint(arch).items()}
