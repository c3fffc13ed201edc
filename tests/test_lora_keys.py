"""kohya LoRA module names <-> checkpoint keys, checked on the full-size key sets and against diffusers."""

from __future__ import annotations

import pytest
from fullsize import full_size_checkpoint, full_size_shapes

from lib_training.formats.detection import UNET_PREFIX
from lib_training.formats.family import Arch
from lib_training.formats.lora_keys import diffusers_unet_path, lora_targets, targets_by_name, unet_blocks_per_level


@pytest.mark.parametrize(("arch", "text", "unet"), [(Arch.SD1, 72, 192), (Arch.SD2, 144, 192), (Arch.SDXL, 264, 722)])
def test_default_targets_count_as_kohya_lora_does(arch: Arch, text: int, unet: int) -> None:
    # kohya: SD1.5 72 text-encoder + 192 UNet modules, SDXL 264 + 722 (SD2's file keeps all 24 layers)
    targets = [t for t in lora_targets(full_size_shapes(arch), arch) if t.default]
    assert sum(t.component != "unet" for t in targets) == text
    assert sum(t.component == "unet" for t in targets) == unet


@pytest.mark.parametrize("arch", list(Arch))
def test_every_name_and_alias_points_to_one_target(arch: Arch) -> None:
    targets = lora_targets(full_size_shapes(arch), arch)
    names = [name for t in targets for name in (t.name, *t.aliases)]
    assert len(names) == len(set(names))
    assert len(targets_by_name(targets)) == len(names)


def test_sd1_names_follow_the_diffusers_to_ldm_conversion() -> None:
    index = targets_by_name(lora_targets(full_size_shapes(Arch.SD1), Arch.SD1))
    expected = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
        ),
        "lora_unet_down_blocks_1_attentions_1_proj_in": "input_blocks.5.1.proj_in",
        "lora_unet_down_blocks_2_resnets_0_conv1": "input_blocks.7.0.in_layers.2",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "input_blocks.4.0.skip_connection",
        "lora_unet_down_blocks_0_downsamplers_0_conv": "input_blocks.3.0.op",
        "lora_unet_mid_block_resnets_1_time_emb_proj": "middle_block.2.emb_layers.1",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (
            "middle_block.1.transformer_blocks.0.ff.net.0.proj"
        ),
        "lora_unet_up_blocks_0_resnets_2_conv2": "output_blocks.2.0.out_layers.3",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
        "lora_unet_up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0": (
            "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"
        ),
    }
    for name, path in expected.items():
        assert index[name].key == f"{UNET_PREFIX}{path}.weight", name
        assert index[name].name == name  # SD1 LoRAs are written with diffusers names
    assert index["lora_unet_input_blocks_1_1_proj_in"].name == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_sdxl_unet_names_are_the_ldm_paths() -> None:
    index = targets_by_name(lora_targets(full_size_shapes(Arch.SDXL), Arch.SDXL))
    target = index["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    assert target.name == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert target.key == UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in target.aliases


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL])
def test_diffusers_names_match_the_modules_of_the_diffusers_unet(arch: Arch) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from test_unet import diffusers_config  # the LDM -> diffusers config the UNet parity tests use

    from lib_training.model.networks.unet import UNetConfig

    checkpoint = {k: v for k, v in full_size_checkpoint(arch).items() if k.startswith(UNET_PREFIX)}
    config = UNetConfig.sd15() if arch is Arch.SD1 else UNetConfig.sdxl_base()
    converted = convert_ldm_unet_checkpoint(checkpoint, diffusers_config(config, checkpoint))
    diffusers_key = {id(tensor): key for key, tensor in converted.items()}
    matched = set()
    for key, tensor in checkpoint.items():
        if key.endswith(".weight") and tensor.ndim in (2, 4):
            path = diffusers_unet_path(key[len(UNET_PREFIX) : -len(".weight")])
            assert path == diffusers_key[id(tensor)].removesuffix(".weight"), key
            matched.add(diffusers_key[id(tensor)])
    assert matched == {k for k, t in converted.items() if k.endswith(".weight") and t.ndim in (2, 4)}


def test_diffusers_names_follow_a_unet_with_one_resblock_a_level() -> None:
    """The tiny world's UNet has one ResBlock a level (two LDM blocks a level, not three): its names are
    what diffusers' converter makes of it, and no two modules share one (LoRA on it once failed so)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from test_unet import diffusers_config

    from lib_training.model.networks.unet import UNetModel
    from lib_training.world.model import unet_config

    config = unet_config()
    checkpoint = {UNET_PREFIX + k: v for k, v in UNetModel(config).state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, diffusers_config(config, checkpoint))
    diffusers_key = {id(tensor): key for key, tensor in converted.items()}
    paths = [k[len(UNET_PREFIX) : -len(".weight")] for k, t in checkpoint.items() if k.endswith(".weight")]
    assert unet_blocks_per_level(paths) == 2
    for key, tensor in checkpoint.items():
        if key.endswith(".weight") and tensor.ndim in (2, 4):
            path = diffusers_unet_path(key[len(UNET_PREFIX) : -len(".weight")], 2)
            assert path == diffusers_key[id(tensor)].removesuffix(".weight"), key
    names = [t.name for t in lora_targets({k: tuple(v.shape) for k, v in checkpoint.items()}, Arch.SD1)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("arch", "component"), [(Arch.SD2, "clip_h"), (Arch.SDXL, "clip_g")])
def test_open_clip_q_k_v_are_rows_of_the_fused_in_proj(arch: Arch, component: str) -> None:
    prefix = "lora_te" if arch is Arch.SD2 else "lora_te2"
    index = targets_by_name(lora_targets(full_size_shapes(arch), arch))
    width = index[f"{prefix}_text_model_encoder_layers_3_self_attn_q_proj"].shape[1]
    for i, projection in enumerate("qkv"):
        target = index[f"{prefix}_text_model_encoder_layers_3_self_attn_{projection}_proj"]
        assert target.key.endswith("transformer.resblocks.3.attn.in_proj_weight")
        assert target.rows == (i * width, (i + 1) * width)
        assert target.shape == (width, width)
        assert target.component == component
    assert index[f"{prefix}_text_model_encoder_layers_3_mlp_fc2"].key.endswith("resblocks.3.mlp.c_proj.weight")
    assert index[f"{prefix}_text_model_encoder_layers_3_self_attn_out_proj"].key.endswith(
        "resblocks.3.attn.out_proj.weight"
    )


def test_sd1_text_encoder_names_are_the_hf_clip_paths() -> None:
    index = targets_by_name(lora_targets(full_size_shapes(Arch.SD1), Arch.SD1))
    target = index["lora_te_text_model_encoder_layers_11_mlp_fc1"]
    assert target.key == "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight"
    assert target.rows is None


def test_sdxl_clip_l_uses_the_te1_prefix() -> None:
    index = targets_by_name(lora_targets(full_size_shapes(Arch.SDXL), Arch.SDXL))
    target = index["lora_te1_text_model_encoder_layers_0_self_attn_k_proj"]
    assert target.key == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"


def test_locon_targets_are_the_resblock_and_sampler_layers() -> None:
    targets = lora_targets(full_size_shapes(Arch.SD1), Arch.SD1)
    conv = {t.name for t in targets if t.conv}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in conv
    assert "lora_unet_up_blocks_1_upsamplers_0_conv" in conv
    assert "lora_unet_conv_in" not in conv and not any(t.default for t in targets if t.conv)
