"""The host's VAE module as our `VAE`, called through its parts (no host wrapper, hook or tiling).

ldm's `AutoencoderKL`, sgm's `AutoencoderKLInferenceWrapper` and Forge's `IntegratedAutoencoderKL`
all have `encoder`, `decoder`, `quant_conv` and `post_quant_conv` (Forge's may be None). Their own
`encode` returns a sample (sgm, Forge) or goes through A1111's --medvram wrappers; the parts give
the distribution itself, as our standalone VAE does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lib_training.model.diffusion import LatentDistribution

LOGVAR_RANGE = (-30.0, 20.0)


class HostVAE:
    def __init__(self, module: nn.Module, prepare: Callable[[], None] | None = None) -> None:
        self.module = module
        self._prepare = prepare

    def encode(self, images: Tensor) -> LatentDistribution:
        """images [B, 3, H, W] in [-1, 1] -> distribution over unscaled latents [B, 4, H/8, W/8]."""
        if self._prepare is not None:
            self._prepare()
        moments = self.module.encoder(images)  # [B, 8, h, w]
        quant_conv = getattr(self.module, "quant_conv", None)
        if quant_conv is not None:
            moments = quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return LatentDistribution(mean, logvar.clamp(*LOGVAR_RANGE))

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1]."""
        if self._prepare is not None:
            self._prepare()
        post_quant_conv = getattr(self.module, "post_quant_conv", None)
        if post_quant_conv is not None:
            latents = post_quant_conv(latents)
        return self.module.decoder(latents)
