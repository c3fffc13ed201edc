"""The denoising loss: MSE in fp32, with optional per-pixel weights, Min-SNR-gamma, noise offset and
multi-resolution noise."""

from __future__ import annotations

import torch
from torch import Tensor

from lib_training.errors import ConfigError
from lib_training.model.noise_schedule import NoiseSchedule


def multires_noise(noise: Tensor, iterations: int, discount: float, generator: torch.Generator) -> Tensor:
    """Multi-resolution ("pyramid") noise: noise [B, C, H, W] plus, for i = 1 .. iterations, N(0, 1)
    drawn at a random fraction 1 / r^i of the size (r uniform in [2, 4)) and upsampled bilinearly,
    weighted discount^i; then scaled back to unit standard deviation. Stops once a side reaches 1.
    Drawn from `generator` (on its device) in fp32; the result has the noise's dtype and device.
    """
    if iterations <= 0:
        return noise
    batch, channels, height, width = noise.shape
    total = noise.float()
    for i in range(1, iterations + 1):
        r = 2 + 2 * torch.rand((), generator=generator, device=generator.device).item()
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        coarse = torch.randn((batch, channels, h, w), generator=generator, device=generator.device)
        up = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        total = total + up.to(total.device) * discount**i
        if h == 1 or w == 1:
            break
    return (total / total.std()).to(noise.dtype)


def noise_offset(noise: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """noise [B, C, H, W] plus `strength` * N(0, 1) drawn once per (sample, channel), equal over H and W.

    The offset is drawn on the generator's device (the noise's device without one) in fp32; the
    result has the noise's dtype and device. A strength of 0 returns `noise` itself.
    """
    if strength == 0:
        return noise
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))  # [B, C, 1, 1]
    device = generator.device if generator is not None else noise.device
    offset = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return (noise.float() + strength * offset.to(noise.device)).to(noise.dtype)


def min_snr_weights(timesteps: Tensor, schedule: NoiseSchedule, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight per sample, [B] float32.

    epsilon prediction: min(snr, gamma) / snr; v prediction: min(snr, gamma) / (snr + 1), where
    snr = alpha_bar / (1 - alpha_bar) at each timestep.
    """
    if not gamma > 0:
        raise ConfigError(f"Min-SNR gamma must be greater than 0 (got {gamma}); 5 is the usual value")
    snr = schedule.snr(timesteps).float()
    clipped = snr.clamp(max=gamma)
    if schedule.prediction == "v":
        return clipped / (snr + 1.0)
    return (gamma / snr).clamp(max=1.0)  # = min(snr, gamma) / snr, and 1 where snr is 0


def diffusion_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    timesteps: Tensor | None = None,
    schedule: NoiseSchedule | None = None,
    min_snr_gamma: float | None = None,
) -> Tensor:
    """Mean squared error between the model output and its target, as a 0-dim float32 tensor.

    pred, target: [B, C, h, w] (any float dtype; the error is computed in fp32). The loss of a
    sample is the mean of its squared errors; the batch's loss is the mean over samples.

    weight: [B, 1, h, w] per-pixel weights (e.g. from PNG alpha). A sample's loss is then the
    weighted mean sum(w * err) / sum(w) over its pixels (and the mean over channels), so scaling
    the weights changes nothing and a half-transparent image trains as strongly as an opaque one;
    a sample whose weights are all 0 contributes 0.

    min_snr_gamma: multiply each sample's loss by `min_snr_weights` at `timesteps` [B] under
    `schedule` (both required then).
    """
    error = (pred.float() - target.float()).square()  # [B, C, h, w]
    dims = tuple(range(1, error.ndim))
    if weight is None:
        per_sample = error.mean(dim=dims)  # [B]
    else:
        w = weight.to(device=error.device, dtype=torch.float32).expand_as(error)
        per_sample = (error * w).sum(dim=dims) / w.sum(dim=dims).clamp(min=torch.finfo(torch.float32).tiny)
    if min_snr_gamma is not None:
        if timesteps is None or schedule is None:
            raise ValueError("Min-SNR weighting needs the timesteps and the noise schedule")
        per_sample = per_sample * min_snr_weights(timesteps, schedule, min_snr_gamma).to(per_sample.device)
    return per_sample.mean()
