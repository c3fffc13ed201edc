"""The denoising loss: plain MSE, per-pixel weights, Min-SNR-gamma, and noise offset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_training.errors import ConfigError
from lib_training.model.noise_schedule import NoiseSchedule
from lib_training.training.loss import diffusion_loss, min_snr_weights, noise_offset


def _pair(seed: int = 0, shape: tuple[int, ...] = (3, 4, 5, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --- noise offset ---------------------------------------------------------------------------------


def test_noise_offset_adds_one_value_per_sample_and_channel() -> None:
    noise = torch.randn(2, 4, 8, 8)
    shifted = noise_offset(noise, 0.1, torch.Generator().manual_seed(1))
    added = shifted - noise  # [B, C, H, W], constant over H and W
    assert torch.allclose(added, added[:, :, :1, :1].expand_as(added), atol=1e-6)
    expected = 0.1 * torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(added[:, :, :1, :1], expected, atol=1e-6)


def test_noise_offset_of_zero_returns_the_noise() -> None:
    noise = torch.randn(1, 4, 2, 2)
    assert noise_offset(noise, 0.0, None) is noise


def test_noise_offset_keeps_dtype() -> None:
    noise = torch.randn(1, 4, 2, 2).half()
    assert noise_offset(noise, 0.05, torch.Generator().manual_seed(0)).dtype == torch.float16


# --- plain and weighted MSE -----------------------------------------------------------------------


def test_loss_without_options_is_mean_squared_error() -> None:
    pred, target = _pair()
    assert torch.allclose(diffusion_loss(pred, target), F.mse_loss(pred, target))


def test_loss_is_computed_in_float32_for_half_inputs() -> None:
    pred, target = _pair()
    loss = diffusion_loss(pred.half(), target.half())
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, F.mse_loss(pred.half().float(), target.half().float()))


def test_uniform_weights_give_the_plain_loss_whatever_their_scale() -> None:
    pred, target = _pair()
    ones = torch.ones(3, 1, 5, 6)
    assert torch.allclose(diffusion_loss(pred, target, weight=ones), diffusion_loss(pred, target))
    assert torch.allclose(diffusion_loss(pred, target, weight=0.25 * ones), diffusion_loss(pred, target))


def test_binary_weights_average_over_the_kept_pixels_only() -> None:
    pred, target = _pair(shape=(1, 4, 4, 4))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0  # keep the top half
    expected = F.mse_loss(pred[..., :2, :], target[..., :2, :])
    assert torch.allclose(diffusion_loss(pred, target, weight=mask), expected)


def test_weights_scale_each_pixel_within_a_sample() -> None:
    pred, target = _pair(shape=(1, 2, 1, 2))
    w = torch.tensor([[[[3.0, 1.0]]]])  # [1, 1, 1, 2]
    err = (pred - target).square()  # [1, 2, 1, 2]
    expected = (3 * err[..., 0] + err[..., 1]).sum() / (4 * 2)  # sum(w * err) / (sum(w) * channels)
    assert torch.allclose(diffusion_loss(pred, target, weight=w), expected)


def test_a_sample_with_zero_weight_contributes_nothing() -> None:
    pred, target = _pair(shape=(2, 4, 3, 3))
    weight = torch.ones(2, 1, 3, 3)
    weight[1] = 0.0
    expected = F.mse_loss(pred[:1], target[:1]) / 2  # the batch mean over two samples, one of them 0
    assert torch.allclose(diffusion_loss(pred, target, weight=weight), expected)


# --- Min-SNR-gamma ------------------------------------------------------------------------------------


def _snr(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    a = schedule.alphas_cumprod[timesteps]
    return a / (1 - a)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weights_each_sample_by_the_formula(prediction: str) -> None:
    schedule = NoiseSchedule.scaled_linear(prediction)
    timesteps = torch.tensor([0, 20, 500, 999])
    pred, target = _pair(shape=(4, 4, 2, 2))
    gamma = 5.0
    snr = _snr(schedule, timesteps)
    factor = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction == "epsilon" else snr + 1)
    per_sample = (pred - target).square().mean(dim=(1, 2, 3))
    loss = diffusion_loss(pred, target, timesteps=timesteps, schedule=schedule, min_snr_gamma=gamma)
    assert torch.allclose(loss, (per_sample * factor).mean())


def test_min_snr_limits_early_timesteps_and_leaves_noisy_ones() -> None:
    schedule = NoiseSchedule.scaled_linear("epsilon")
    weights = min_snr_weights(torch.tensor([0, 999]), schedule, 5.0)
    assert weights[0] < 0.01  # snr ~ 1000 at t=0: weight gamma / snr
    assert weights[1] == 1.0  # snr < gamma: full weight


def test_min_snr_with_a_huge_gamma_changes_nothing_for_epsilon() -> None:
    schedule = NoiseSchedule.scaled_linear("epsilon")
    pred, target = _pair(shape=(2, 4, 2, 2))
    timesteps = torch.tensor([3, 700])
    weighted = diffusion_loss(pred, target, timesteps=timesteps, schedule=schedule, min_snr_gamma=1e9)
    assert torch.allclose(weighted, diffusion_loss(pred, target))


def test_min_snr_and_pixel_weights_combine() -> None:
    schedule = NoiseSchedule.scaled_linear("epsilon")
    pred, target = _pair(shape=(2, 4, 2, 2))
    timesteps = torch.tensor([0, 999])
    mask = torch.ones(2, 1, 2, 2)
    mask[:, :, 0] = 0.0
    per_sample = (pred - target)[..., 1, :].square().mean(dim=(1, 2))
    expected = (per_sample * min_snr_weights(timesteps, schedule, 5.0)).mean()
    loss = diffusion_loss(pred, target, weight=mask, timesteps=timesteps, schedule=schedule, min_snr_gamma=5.0)
    assert torch.allclose(loss, expected)


def test_min_snr_needs_timesteps_and_schedule() -> None:
    pred, target = _pair()
    with pytest.raises(ValueError, match="timesteps"):
        diffusion_loss(pred, target, min_snr_gamma=5.0)


def test_min_snr_gamma_must_be_positive() -> None:
    schedule = NoiseSchedule.scaled_linear()
    with pytest.raises(ConfigError, match="greater than 0"):
        min_snr_weights(torch.tensor([1]), schedule, 0.0)
