"""Our LDM-layout UNet: parity with diffusers, real checkpoint layouts, config inference, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

from lib_training.errors import CheckpointError
from lib_training.formats.family import Arch
from lib_training.model.networks.timestep import timestep_embedding
from lib_training.model.networks.unet import ResBlock, UNetConfig, UNetModel, unet_config_from_shapes
from lib_training.model.tiny import randomize_weights

LDM_PREFIX = "model.diffusion_model."
SIZE_EMBED_DIM = 256  # SGM embeds each of SDXL's six size values with a 256-wide sinusoid

PRESETS = {"sd15": UNetConfig.sd15, "sd21": UNetConfig.sd21, "sdxl_base": UNetConfig.sdxl_base}
PRESET_ARCH = {"sd15": Arch.SD1, "sd21": Arch.SD2, "sdxl_base": Arch.SDXL}


def tiny_unet(arch: Arch, seed: int = 0) -> UNetModel:
    model = UNetModel(UNetConfig.tiny(arch))
    randomize_weights(model, torch.Generator().manual_seed(seed))
    return model.eval()


def meta_unet(config: UNetConfig) -> UNetModel:
    with torch.device("meta"):
        return UNetModel(config)


def diffusers_config(config: UNetConfig, checkpoint: dict[str, torch.Tensor]) -> dict:
    """The diffusers UNet config that diffusers derives from the LDM/SGM yaml params of `config`."""
    section = "network_config" if config.adm_in_channels is not None else "unet_config"
    original = {
        "model": {
            "params": {
                section: {"params": config.ldm_params()},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    result = create_unet_diffusers_config_from_ldm(original, checkpoint)
    if config.adm_in_channels is not None:
        # diffusers recognises SDXL by its context width (2048); the tiny SDXL has the same vector
        # conditioning, so use the same embedding of pooled text + size values.
        result.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SIZE_EMBED_DIM,
            class_embed_type=None,
            projection_class_embeddings_input_dim=config.adm_in_channels,
        )
    return result


def to_diffusers(model: UNetModel) -> UNet2DConditionModel:
    checkpoint = {LDM_PREFIX + key: value for key, value in model.state_dict().items()}
    config = diffusers_config(model.config, checkpoint)
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SGM's y: the pooled text embedding, then each size value as a 256-wide sinusoid (cos first)."""
    sizes = timestep_embedding(time_ids.flatten(), SIZE_EMBED_DIM).reshape(time_ids.shape[0], -1)
    return torch.cat([pooled, sizes], dim=-1)


# --- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(Arch), ids=[a.value for a in Arch])
def test_unet_matches_diffusers_for_tiny_model(arch: Arch) -> None:
    model = tiny_unet(arch)
    reference = to_diffusers(model)
    config = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, 16, 16, generator=gen)
    timesteps = torch.tensor([17, 903])
    context = torch.randn(2, 77, config.context_dim, generator=gen)
    y = None
    added_cond_kwargs = None
    if config.adm_in_channels is not None:
        pooled = torch.randn(2, config.adm_in_channels - 6 * SIZE_EMBED_DIM, generator=gen)
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 512.0, 16.0, 0.0, 640.0, 512.0]])
        y = sdxl_vector(pooled, time_ids)
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}

    with torch.no_grad():
        ours = model(x, timesteps, context, y)
        theirs = reference(x, timesteps, context, added_cond_kwargs=added_cond_kwargs).sample

    assert ours.shape == (2, config.out_channels, 16, 16)
    assert ours.abs().max() > 0.1  # a real signal, not a degenerate all-zero output
    assert (ours - theirs).abs().max().item() <= 1e-4


# --- full-size structure (meta device) ------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "count"),
    [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl_base", 2_567_463_684)],
)
def test_full_size_unet_has_published_parameter_count(preset: str, count: int) -> None:
    model = meta_unet(PRESETS[preset]())
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize(
    ("preset", "key", "shape"),
    [
        ("sd15", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
        ("sd15", "input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
        ("sd15", "input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
        ("sd15", "input_blocks.3.0.op.weight", (320, 320, 3, 3)),
        ("sd15", "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", (10240, 1280)),
        ("sd15", "output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
        ("sd15", "output_blocks.5.2.conv.weight", (1280, 1280, 3, 3)),
        ("sd15", "output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.bias", (320,)),
        ("sd15", "time_embed.2.weight", (1280, 1280)),
        ("sd15", "out.2.weight", (4, 320, 3, 3)),
        ("sd21", "middle_block.1.proj_in.weight", (1280, 1280)),
        ("sd21", "input_blocks.7.1.transformer_blocks.0.attn2.to_v.weight", (1280, 1024)),
        ("sd21", "output_blocks.3.0.in_layers.0.weight", (2560,)),
        ("sdxl_base", "label_emb.0.0.weight", (1280, 2816)),
        ("sdxl_base", "label_emb.0.2.weight", (1280, 1280)),
        ("sdxl_base", "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", (640, 2048)),
        ("sdxl_base", "input_blocks.8.1.transformer_blocks.9.norm3.weight", (1280,)),
        ("sdxl_base", "middle_block.1.transformer_blocks.9.ff.net.2.weight", (1280, 5120)),
        ("sdxl_base", "output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
        ("sdxl_base", "output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
        ("sdxl_base", "output_blocks.8.0.skip_connection.weight", (320, 640, 1, 1)),
    ],
)
def test_full_size_unet_has_real_checkpoint_key(preset: str, key: str, shape: tuple[int, ...]) -> None:
    state = meta_unet(PRESETS[preset]()).state_dict()
    assert tuple(state[key].shape) == shape


def test_sdxl_unet_has_no_attention_at_full_resolution() -> None:
    state = meta_unet(UNetConfig.sdxl_base()).state_dict()
    assert not any(key.startswith(("input_blocks.1.1.", "input_blocks.2.1.", "output_blocks.8.1.")) for key in state)
    assert "input_blocks.9.0.in_layers.2.weight" not in state  # three levels: 8 input blocks after conv_in


@pytest.mark.parametrize("preset", list(PRESETS))
def test_diffusers_converts_every_key_of_full_size_unet(preset: str) -> None:
    config = PRESETS[preset]()
    state = meta_unet(config).state_dict()
    checkpoint = {LDM_PREFIX + key: value for key, value in state.items()}
    diff_config = diffusers_config(config, checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, diff_config)

    assert {id(value) for value in converted.values()} == {id(value) for value in state.values()}
    with torch.device("meta"):
        reference = UNet2DConditionModel(**diff_config)
    reference.load_state_dict(converted, strict=True, assign=True)


# --- config inference -----------------------------------------------------------------------------
def shapes_of(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in meta_unet(config).state_dict().items()}


CONFIG_CASES = {
    "sd15": (UNetConfig.sd15(), Arch.SD1),
    "sd21": (UNetConfig.sd21(), Arch.SD2),
    "sdxl_base": (UNetConfig.sdxl_base(), Arch.SDXL),
    "tiny_sd1": (UNetConfig.tiny(Arch.SD1), Arch.SD1),
    "tiny_sd2": (UNetConfig.tiny(Arch.SD2), Arch.SD2),
    "tiny_sdxl": (UNetConfig.tiny(Arch.SDXL), Arch.SDXL),
    "sd15_inpainting": (dataclasses.replace(UNetConfig.sd15(), in_channels=9), Arch.SD1),
    "sdxl_inpainting": (dataclasses.replace(UNetConfig.sdxl_base(), in_channels=9), Arch.SDXL),
    "sd15_pix2pix": (dataclasses.replace(UNetConfig.sd15(), in_channels=8), Arch.SD1),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_from_shapes_recovers_config(case: str) -> None:
    config, arch = CONFIG_CASES[case]
    assert unet_config_from_shapes(shapes_of(config), arch) == config


def test_config_from_shapes_rejects_unrelated_keys() -> None:
    shapes = {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}
    with pytest.raises(CheckpointError, match="not a Stable Diffusion UNet"):
        unet_config_from_shapes(shapes, Arch.SD1)


def test_config_from_shapes_rejects_truncated_unet() -> None:
    shapes = {k: v for k, v in shapes_of(UNetConfig.tiny(Arch.SD1)).items() if not k.startswith("output_blocks")}
    with pytest.raises(CheckpointError, match="output_blocks"):
        unet_config_from_shapes(shapes, Arch.SD1)


def test_config_from_shapes_points_at_leftover_checkpoint_prefix() -> None:
    shapes = {LDM_PREFIX + k: v for k, v in shapes_of(UNetConfig.tiny(Arch.SD1)).items()}
    with pytest.raises(CheckpointError, match="prefix"):
        unet_config_from_shapes(shapes, Arch.SD1)


# --- training and dtypes --------------------------------------------------------------------------
def loss_and_grads(model: UNetModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, model.config.context_dim, generator=gen)
    model.zero_grad()
    loss = model(x, torch.tensor([5, 500]), context).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_same_loss_and_gradients() -> None:
    model = tiny_unet(Arch.SD1).train()
    loss, grads = loss_and_grads(model)
    model.set_gradient_checkpointing(True)
    loss_ckpt, grads_ckpt = loss_and_grads(model)

    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_recomputes_blocks_in_backward() -> None:
    model = tiny_unet(Arch.SD1).train()
    block = model.input_blocks[1]
    calls = {"res": 0, "transformer": 0}
    res_block, transformer = block[0], block[1]
    assert isinstance(res_block, ResBlock)
    res_block.in_layers.register_forward_hook(lambda *_: calls.__setitem__("res", calls["res"] + 1))
    transformer.norm.register_forward_hook(lambda *_: calls.__setitem__("transformer", calls["transformer"] + 1))

    model.set_gradient_checkpointing(True)
    loss_and_grads(model)
    assert calls == {"res": 2, "transformer": 2}


def test_gradient_checkpointing_is_skipped_without_grad() -> None:
    model = tiny_unet(Arch.SD1)
    model.set_gradient_checkpointing(True)
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, model.config.context_dim)
    with torch.no_grad():
        with_switch = model(x, torch.tensor([10]), context)
    model.set_gradient_checkpointing(False)
    with torch.no_grad():
        without = model(x, torch.tensor([10]), context)
    torch.testing.assert_close(with_switch, without, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_forward_computes_in_weight_dtype(dtype: torch.dtype) -> None:
    model = tiny_unet(Arch.SDXL)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, model.config.context_dim, generator=gen)
    y = torch.randn(1, model.config.adm_in_channels, generator=gen)
    timesteps = torch.tensor([250.0])
    with torch.no_grad():
        full = model(x, timesteps, context, y)
        half = model.to(dtype)(x, timesteps, context, y)

    assert half.dtype == dtype
    assert (half.float() - full).abs().max() <= 0.05 * full.abs().max()


def test_sdxl_unet_requires_vector_conditioning() -> None:
    model = tiny_unet(Arch.SDXL)
    with pytest.raises(ValueError, match="y"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, model.config.context_dim))


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL])
def test_latent_sides_not_divisible_by_the_downsampling_work(arch: Arch) -> None:
    """Any multiple of 8 pixels is a valid image side: a 6x10 latent comes back as 6x10."""
    config = UNetConfig.tiny(arch)
    model = UNetModel(config)
    y = torch.zeros(1, config.adm_in_channels) if config.adm_in_channels else None
    out = model(torch.randn(1, 4, 6, 10), torch.tensor([10]), torch.randn(1, 77, config.context_dim), y)
    assert out.shape == (1, 4, 6, 10)


def test_a_first_level_wider_than_model_channels_builds_and_runs() -> None:
    config = UNetConfig(model_channels=32, channel_mult=(2, 2), transformer_depth=(1, 0), context_dim=32, num_heads=2)
    unet = UNetModel(config)
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32))
    assert out.shape == (1, 4, 8, 8)
