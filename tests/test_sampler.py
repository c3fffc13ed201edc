"""The preview sampler: seeded, deterministic, guided, and right about SDXL size conditioning."""

from __future__ import annotations

import pytest
import torch

from lib_training.errors import ConfigError
from lib_training.model.sampler import SampleSettings, generate, sample_latents, spaced_timesteps

SMALL = {"width": 64, "height": 64, "steps": 3}


def test_spaced_timesteps_start_at_the_noisiest_and_are_evenly_spaced() -> None:
    ts = spaced_timesteps(1000, 4)
    assert ts.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_same_seed_gives_the_same_image(tiny_sd1, sampler: str) -> None:
    settings = SampleSettings("a cat", seed=3, sampler=sampler, **SMALL)
    a, b = generate(tiny_sd1, settings), generate(tiny_sd1, settings)
    assert a.tobytes() == b.tobytes()
    assert a.size == (64, 64)


def test_different_seeds_give_different_latents(tiny_sd1) -> None:
    a = sample_latents(tiny_sd1, SampleSettings("a cat", seed=1, **SMALL))
    b = sample_latents(tiny_sd1, SampleSettings("a cat", seed=2, **SMALL))
    assert not torch.allclose(a, b)


def test_guidance_scale_changes_the_result(tiny_sd1) -> None:
    a = sample_latents(tiny_sd1, SampleSettings("a cat", cfg_scale=1.0, **SMALL))
    b = sample_latents(tiny_sd1, SampleSettings("a cat", cfg_scale=9.0, **SMALL))
    assert not torch.allclose(a, b)


def test_one_ddim_step_returns_the_predicted_clean_latent(tiny_sd1) -> None:
    """With a single step from t=999, DDIM's result is the model's x0 estimate."""
    settings = SampleSettings("a cat", steps=1, cfg_scale=1.0, width=64, height=64, sampler="ddim")
    latents = sample_latents(tiny_sd1, settings)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = tiny_sd1.encode_prompts(["a cat"])
    t = torch.tensor([999])
    x0, _ = tiny_sd1.schedule.to_x0_and_eps(tiny_sd1.predict(noise, t, cond), noise, t)
    torch.testing.assert_close(latents, x0.float(), rtol=1e-4, atol=1e-4)


def test_sdxl_generation_conditions_on_the_requested_size(tiny_sdxl, monkeypatch) -> None:
    seen = []
    original = tiny_sdxl.size_vector
    monkeypatch.setattr(tiny_sdxl, "size_vector", lambda pooled, sizes: seen.extend(sizes) or original(pooled, sizes))
    sample_latents(tiny_sdxl, SampleSettings("a cat", width=64, height=48, steps=1))
    assert {s.values() for s in seen} == {(48, 64, 0, 0, 48, 64)}


def test_sdxl_size_vector_is_pooled_then_six_sinusoids(tiny_sdxl) -> None:
    from lib_training.model.diffusion import SizeConditioning
    from lib_training.model.networks.timestep import timestep_embedding

    pooled = torch.randn(1, 128)
    y = tiny_sdxl.size_vector(pooled, [SizeConditioning((48, 64), (2, 3), (40, 56))])
    assert y.shape == (1, 128 + 6 * 256)
    torch.testing.assert_close(y[:, :128], pooled)
    expected = timestep_embedding(torch.tensor([48.0, 64, 2, 3, 40, 56]), 256).reshape(1, -1)
    torch.testing.assert_close(y[:, 128:], expected)


def test_bad_size_is_a_config_error(tiny_sd1) -> None:
    with pytest.raises(ConfigError, match="multiples of 8"):
        generate(tiny_sd1, SampleSettings("x", width=100, height=64, steps=1))


def test_step_callback_counts_every_step(tiny_sd1) -> None:
    seen: list[tuple[int, int]] = []
    generate(tiny_sd1, SampleSettings("x", **SMALL), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
