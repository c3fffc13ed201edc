"""Tiny random models with the real block structure of each family, for demos and tests."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter of `module` a random, well-scaled value (deterministic for a seeded generator).

    Matrices and kernels get N(0, 1/fan_in) so activations keep their scale through deep stacks;
    normalisation scales get 1 + N(0, 0.1^2); biases and 1-D parameters N(0, 0.02^2); embedding
    tables N(0, 0.02^2) like CLIP's. Layers that real models zero-initialise (output projections)
    are randomised too, so every path of the model affects the output.
    """
    for name, param in module.named_parameters():
        if param.ndim >= 2 and ("embedding" in name or name.endswith("positional_embedding")):
            values = torch.randn(param.shape, generator=generator) * 0.02
        elif param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
        elif param.ndim == 1 and name.endswith("weight"):  # GroupNorm / LayerNorm scale
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            values = 0.02 * torch.randn(param.shape, generator=generator)
        param.copy_(values.to(param.dtype))


TINY_ARCHS = ("sd1", "sd2", "sd2-v", "sdxl")

# modelspec architecture names of the full-size families (modelspec.architecture).
_MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}


def make_tiny(arch: str, seed: int = 0):  # -> StandaloneModel (import cycle kept out of the signature)
    """A tiny random model of the family `arch` ("sd1", "sd2", "sd2-v", "sdxl"), deterministic in `seed`.

    Same block structure and key names as the real family at small widths (UNet 32-64 channels,
    text encoders 64-128 wide with 3 layers, VAE 32 channels), token vocabulary 49408 so the real
    tokenizer works.
    """
    from lib_training.formats.family import ModelFamily
    from lib_training.model.networks.text_encoder import TextEncoderConfig
    from lib_training.model.networks.unet import UNetConfig
    from lib_training.model.networks.vae import VAEConfig
    from lib_training.model.standalone import build_random

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    family = ModelFamily.parse(arch)
    model = build_random(
        family,
        UNetConfig.tiny(family.arch),
        VAEConfig.tiny(),
        TextEncoderConfig.for_arch(family.arch, tiny=True),
        seed,
    )
    model.metadata = {
        "modelspec.architecture": _MODELSPEC_ARCH[arch],
        "modelspec.title": f"tiny random {arch} (seed {seed})",
        "sdwt.tiny": "true",
    }
    return model
