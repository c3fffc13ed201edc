"""Our LDM-layout VAE against diffusers' AutoencoderKL loaded through diffusers' own LDM conversion."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)

from lib_training.errors import CheckpointError
from lib_training.model.networks.vae import (
    AutoencoderKL,
    VAEConfig,
    normalize_vae_state_dict,
    vae_config_from_shapes,
)
from lib_training.model.tiny import randomize_weights

PREFIX = "first_stage_model."
SD_VAE_PARAMETERS = 83_653_863


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    model = AutoencoderKL(VAEConfig.tiny()).eval()
    randomize_weights(model, torch.Generator().manual_seed(seed))
    return model


def random_images(batch: int = 2, side: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def to_diffusers(model: AutoencoderKL) -> tuple[dict, dict]:
    """(diffusers config, converted state dict) of our model, as diffusers reads an LDM checkpoint."""
    checkpoint = {PREFIX + key: value for key, value in model.state_dict().items()}
    first_stage = {"params": {"ddconfig": model.config.ldm_params(), "embed_dim": model.config.embed_dim}}
    original_config = {"model": {"params": {"first_stage_config": first_stage}}}
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    return config, convert_ldm_vae_checkpoint(checkpoint, config)


def diffusers_twin(model: AutoencoderKL) -> DiffusersAutoencoderKL:
    config, converted = to_diffusers(model)
    reference = DiffusersAutoencoderKL(**config).eval()
    reference.load_state_dict(converted, strict=True)
    return reference


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_tiny_vae_encode_matches_diffusers() -> None:
    model = tiny_vae()
    reference = diffusers_twin(model)
    images = random_images()
    ours = model.encode(images)
    theirs = reference.encode(images).latent_dist
    assert ours.mean.shape == (2, 4, 8, 8)
    assert max_diff(ours.mean, theirs.mean) < 1e-4
    assert max_diff(ours.logvar, theirs.logvar) < 1e-4


@torch.no_grad()
def test_tiny_vae_decode_matches_diffusers() -> None:
    model = tiny_vae()
    reference = diffusers_twin(model)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = model.decode(latents)
    assert ours.shape == (2, 3, 64, 64)
    assert max_diff(ours, reference.decode(latents).sample) < 1e-4


def test_logvar_is_clamped_like_ldm() -> None:
    model = tiny_vae()
    with torch.no_grad():
        model.quant_conv.bias[4:] = 100.0  # the logvar half of the moments
        logvar = model.encode(random_images(batch=1)).logvar
    assert logvar.max().item() == 20.0


def meta_sd_vae() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(VAEConfig.sd())


def test_sd_vae_has_the_real_parameter_count() -> None:
    assert sum(p.numel() for p in meta_sd_vae().parameters()) == SD_VAE_PARAMETERS


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("encoder.conv_in.weight", (128, 3, 3, 3)),
        ("encoder.down.0.block.0.conv1.weight", (128, 128, 3, 3)),
        ("encoder.down.1.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
        ("encoder.down.2.downsample.conv.weight", (512, 512, 3, 3)),
        ("encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
        ("encoder.conv_out.weight", (8, 512, 3, 3)),
        ("quant_conv.weight", (8, 8, 1, 1)),
        ("post_quant_conv.weight", (4, 4, 1, 1)),
        ("decoder.conv_in.weight", (512, 4, 3, 3)),
        ("decoder.mid.attn_1.proj_out.weight", (512, 512, 1, 1)),
        ("decoder.up.0.block.0.conv1.weight", (128, 256, 3, 3)),
        ("decoder.up.0.block.2.conv2.weight", (128, 128, 3, 3)),
        ("decoder.up.1.block.0.nin_shortcut.weight", (256, 512, 1, 1)),
        ("decoder.up.3.block.0.conv1.weight", (512, 512, 3, 3)),
        ("decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
        ("decoder.conv_out.weight", (3, 128, 3, 3)),
    ],
)
def test_sd_vae_key_has_ldm_shape(key: str, shape: tuple[int, ...]) -> None:
    assert tuple(meta_sd_vae().state_dict()[key].shape) == shape


@pytest.mark.parametrize(
    "absent",
    [
        "encoder.down.3.downsample.conv.weight",
        "decoder.up.0.upsample.conv.weight",
        "encoder.mid.attn_1.qkv.weight",
    ],
)
def test_sd_vae_has_no_key_ldm_lacks(absent: str) -> None:
    assert absent not in meta_sd_vae().state_dict()


def test_diffusers_conversion_of_sd_vae_uses_every_key_and_loads_strictly() -> None:
    model = meta_sd_vae()
    config, converted = to_diffusers(model)
    assert len(converted) == len(model.state_dict())
    assert sum(t.numel() for t in converted.values()) == SD_VAE_PARAMETERS
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**config)
    reference.load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize("config", [VAEConfig.sd(), VAEConfig.tiny()], ids=["sd", "tiny"])
def test_config_is_recovered_from_shapes(config: VAEConfig) -> None:
    with torch.device("meta"):
        state_dict = AutoencoderKL(config).state_dict()
    assert vae_config_from_shapes({key: tuple(t.shape) for key, t in state_dict.items()}) == config


def test_config_from_shapes_accepts_linear_attention_weights_and_training_keys() -> None:
    shapes = {key: tuple(t.shape) for key, t in tiny_vae().state_dict().items()}
    shapes["decoder.mid.attn_1.q.weight"] = (128, 128)
    shapes["loss.discriminator.main.0.weight"] = (64, 3, 4, 4)
    assert vae_config_from_shapes(shapes) == VAEConfig.tiny()


def test_config_from_shapes_rejects_unet_keys() -> None:
    shapes = {"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3)}
    with pytest.raises(CheckpointError, match="not a Stable Diffusion VAE"):
        vae_config_from_shapes(shapes)


def test_config_from_shapes_names_the_diffusers_layout() -> None:
    shapes = {"encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3)}
    with pytest.raises(CheckpointError, match="diffusers layout"):
        vae_config_from_shapes(shapes)


def test_config_from_shapes_rejects_a_missing_block() -> None:
    shapes = {key: tuple(t.shape) for key, t in tiny_vae().state_dict().items()}
    del shapes["decoder.up.1.block.2.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"missing decoder\.up\.1\.block\.2\.conv1\.weight"):
        vae_config_from_shapes(shapes)


def test_config_from_shapes_rejects_a_wrong_shape() -> None:
    shapes = {key: tuple(t.shape) for key, t in tiny_vae().state_dict().items()}
    shapes["encoder.mid.attn_1.k.weight"] = (128, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.attn_1\.k\.weight has shape"):
        vae_config_from_shapes(shapes)


@torch.no_grad()
def test_normalized_linear_attention_weights_load_and_give_the_same_output() -> None:
    model = tiny_vae()
    linear = {
        key: value.flatten(1) if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight")) else value
        for key, value in model.state_dict().items()
    }
    linear["encoder.mid.attn_1.proj_out.weight"] = linear["encoder.mid.attn_1.proj_out.weight"].flatten(1)
    assert linear["decoder.mid.attn_1.v.weight"].ndim == 2
    loaded = AutoencoderKL(VAEConfig.tiny()).eval()
    loaded.load_state_dict(normalize_vae_state_dict(linear), strict=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.decode(latents), model.decode(latents))
    assert torch.equal(loaded.encode(random_images()).mean, model.encode(random_images()).mean)


def test_normalize_drops_training_only_keys() -> None:
    state_dict = dict(tiny_vae().state_dict())
    state_dict["loss.logvar"] = torch.zeros(())
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    assert set(normalize_vae_state_dict(state_dict)) == set(tiny_vae().state_dict())


@torch.no_grad()
def test_encode_and_decode_compute_in_bf16() -> None:
    model = tiny_vae()
    images = random_images(batch=1)
    reference = model.encode(images).mean
    model.to(torch.bfloat16)
    dist = model.encode(images)  # float32 images are cast to the weights' dtype
    decoded = model.decode(dist.mean)
    assert dist.mean.dtype == dist.logvar.dtype == decoded.dtype == torch.bfloat16
    assert decoded.shape == (1, 3, 64, 64)
    assert max_diff(dist.mean, reference) < 0.1 * reference.abs().max().item()
