"""Full-size models, built on the meta device: the whole checkpoint has the real keys and sizes."""

from __future__ import annotations

from fullsize import full_size_checkpoint

from lib_training.formats.detection import detect_family
from lib_training.formats.family import Arch
from lib_training.model.networks.unet import UNetConfig, unet_config_from_shapes


def test_sd15_checkpoint_has_the_real_tensor_and_parameter_counts() -> None:
    """SD1.5 pruned: 1,066,235,307 parameters in 1,131 tensors (UNet + CLIP-L + VAE + position_ids)."""
    tensors = full_size_checkpoint(Arch.SD1)
    assert len(tensors) == 1131
    assert sum(t.numel() for t in tensors.values() if t.is_floating_point()) == 1_066_235_307
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].shape == (1, 77)
    assert tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (
        49408,
        768,
    )


def test_sdxl_checkpoint_keys_detect_as_sdxl_and_reinfer_the_unet() -> None:
    tensors = full_size_checkpoint(Arch.SDXL)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert detect_family(shapes, {}, "sdxl").name == "sdxl"
    unet = {k.removeprefix("model.diffusion_model."): s for k, s in shapes.items() if k.startswith("model.")}
    assert unet_config_from_shapes(unet, Arch.SDXL) == UNetConfig.sdxl_base()
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)


def test_sd21_checkpoint_keys_detect_as_sd2() -> None:
    tensors = full_size_checkpoint(Arch.SD2)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert detect_family(shapes, {}, "sd21").arch is Arch.SD2
    assert shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
