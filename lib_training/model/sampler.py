"""Preview sampling: DDIM or Euler with classifier-free guidance, seeded and deterministic.

This is for previews during training and the standalone Generate panel, not a replacement for a
WebUI's samplers. Both samplers walk the model's own discrete timesteps, evenly spaced, so no
sigma-to-timestep interpolation is needed and v- and epsilon-prediction share one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lib_training.errors import ConfigError
from lib_training.model.diffusion import Conditioning, DiffusionModel, EmbeddingVectors, SizeConditioning

SamplerName = Literal["euler", "ddim"]
LATENT_FACTOR = 8  # pixels per latent cell


@dataclass(frozen=True)
class SampleSettings:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: SamplerName = "euler"

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {self.steps})")
        if self.width % LATENT_FACTOR or self.height % LATENT_FACTOR:
            raise ConfigError(f"width and height must be multiples of {LATENT_FACTOR} (got {self.width}x{self.height})")


def spaced_timesteps(num_train_steps: int, steps: int) -> Tensor:
    """`steps` timesteps from the noisiest (T - 1) down, evenly spaced ("trailing" spacing)."""
    stride = num_train_steps // steps
    ts = torch.arange(steps, dtype=torch.long) * stride + (num_train_steps - 1 - (steps - 1) * stride)
    return ts.flip(0)


@torch.no_grad()
def sample_latents(
    model: DiffusionModel,
    settings: SampleSettings,
    embeddings: Mapping[str, EmbeddingVectors] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    cond: Conditioning | None = None,
) -> Tensor:
    """Denoise seeded noise into latents [1, 4, h/8, w/8] (scaled), float32.

    `cond` is the conditioning of [prompt, negative prompt] when it is already known (text outputs
    cached while training); then the text encoders are not called.
    """
    settings.check()
    if cond is None:
        size = SizeConditioning((settings.height, settings.width))
        prompts = [settings.prompt, settings.negative_prompt]
        chunks = model.count_chunks(prompts, embeddings)
        cond = model.encode_prompts(prompts, embeddings, sizes=[size, size], min_chunks=chunks)  # [2, ...]

    generator = torch.Generator().manual_seed(settings.seed)
    shape = (1, 4, settings.height // LATENT_FACTOR, settings.width // LATENT_FACTOR)
    noise = torch.randn(shape, generator=generator).to(model.device)
    schedule = model.schedule
    timesteps = spaced_timesteps(schedule.num_steps, settings.steps).to(model.device)
    ac = schedule.alphas_cumprod.to(model.device)

    def guided_x0_eps(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        out = model.predict(torch.cat([x_t, x_t]), t.repeat(2), cond).float()
        out_pos, out_neg = out.chunk(2)
        guided = out_neg + settings.cfg_scale * (out_pos - out_neg)
        return schedule.to_x0_and_eps(guided, x_t, t.reshape(1))

    # Both samplers track x_t, the DDPM-scaled latent (x_t = sqrt(a) x0 + sqrt(1-a) eps), starting
    # from pure noise at the first (highest) timestep.
    x = noise
    for i, t in enumerate(timesteps):
        x0, eps = guided_x0_eps(x.float(), t)
        a_next = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, device=x.device)
        if settings.sampler == "ddim":
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        else:
            # Euler in sigma space: sigma = sqrt((1-a)/a), x_sigma = x_t / sqrt(a).
            a_t = ac[t]
            sigma, sigma_next = ((1 - a_t) / a_t).sqrt(), ((1 - a_next) / a_next).sqrt()
            x_sigma = x / a_t.sqrt()
            derivative = (x_sigma - x0) / sigma
            x = (x_sigma + derivative * (sigma_next - sigma)) * a_next.sqrt()
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return x.float()


def latents_to_images(model: DiffusionModel, latents: Tensor) -> list[Image.Image]:
    images = model.decode_latents(latents)  # [B, 3, H, W] in [-1, 1]
    array = ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def generate(
    model: DiffusionModel,
    settings: SampleSettings,
    embeddings: Mapping[str, EmbeddingVectors] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    cond: Conditioning | None = None,
) -> Image.Image:
    """One image for `settings`; the same settings always give the same image on the same device."""
    return latents_to_images(model, sample_latents(model, settings, embeddings, on_step, cond))[0]
