"""The module names our LoRA files use: kohya's sets, and every key found by A1111's and ComfyUI's loaders.

The two loaders are re-stated here from reading their sources (A1111
`extensions-builtin/Lora/networks.py`: `convert_diffusers_name_to_compvis`, the layer names from
`named_modules`, the `_q_proj` fallback to the fused attention, the SDXL `lora_unet` / `lora_te1`
fallbacks; ComfyUI `comfy/lora.py`: `model_lora_keys_unet` / `model_lora_keys_clip` and the parts
`load_lora` takes), so that a name either of them would drop fails here.
"""

from __future__ import annotations

import re

import pytest
from fullsize import full_size_checkpoint, full_size_model, full_size_shapes

from lib_training.formats.detection import UNET_PREFIX
from lib_training.formats.family import Arch
from lib_training.methods.lora import LoraConfig
from lib_training.methods.lora.method import chosen_layers

EVERYTHING = LoraConfig(name="all", locon=True, train_text_encoder=True, dora=True)
PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")


def _names(arch: Arch, settings: LoraConfig = EVERYTHING) -> list[str]:
    return [entry.kohya for entry in chosen_layers(full_size_model(arch), settings)]


def _file_keys(arch: Arch) -> list[str]:
    return [f"{name}.{part}" for name in _names(arch) for part in PARTS]


@pytest.mark.parametrize(("arch", "text", "unet"), [(Arch.SD1, 72, 192), (Arch.SD2, 144, 192), (Arch.SDXL, 264, 722)])
def test_default_set_is_kohyas(arch: Arch, text: int, unet: int) -> None:
    layers = chosen_layers(full_size_model(arch), LoraConfig(name="x", train_text_encoder=True))
    assert sum(e.component == "unet" for e in layers) == unet
    assert sum(e.component != "unet" for e in layers) == text


def test_without_text_encoder_only_the_unet_trains() -> None:
    layers = chosen_layers(full_size_model(Arch.SD1), LoraConfig(name="x"))
    assert {e.component for e in layers} == {"unet"} and len(layers) == 192


def test_locon_adds_the_resblocks_and_samplers() -> None:
    names = set(_names(Arch.SD1, LoraConfig(name="x", locon=True)))
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in names
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in names
    assert "lora_unet_conv_in" not in names and "lora_unet_time_embedding_linear_1" not in names


# --- A1111 ------------------------------------------------------------------------------------------

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}  # fmt: skip


def _a1111_compvis(key: str, is_sd2: bool) -> str:
    """A1111's diffusers -> compvis name conversion (the cases kohya files use)."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * j}_{rest}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * i}_{2 if i > 0 else 1}_conv"
    open_clip = {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj"}
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            rest = open_clip.get(m[2], m[2].replace("self_attn", "attn"))
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{m[1]}_{open_clip.get(m[2], m[2].replace('self_attn', 'attn'))}"
    return key


def _a1111_layer_names(arch: Arch) -> set[str]:
    """A1111's network_layer_mapping: named_modules of the LDM model and of the text encoders' wrappers."""
    names = set()
    prefixes = {
        "model.": "",
        "cond_stage_model.": "",
        "conditioner.embedders.0.": "0_",
        "conditioner.embedders.1.": "1_",
    }
    for key in full_size_shapes(arch):
        for prefix, tag in prefixes.items():
            if key.startswith(prefix) and key.endswith("weight"):
                parts = key[len(prefix) :].removesuffix(".weight").removesuffix(".in_proj_weight").split(".")
                for end in range(1, len(parts) + 1):  # the module and its parents, as named_modules lists them
                    names.add(tag + "_".join(parts[:end]))
    return names


def _a1111_match(network_key: str, layers: set[str], is_sd2: bool) -> str | None:
    """The layer A1111 gives a file key's module, or None (it would be in keys_failed_to_match)."""
    base = network_key.split(".", 1)[0]
    key = _a1111_compvis(base, is_sd2)
    if key in layers:
        return key
    if (m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in layers:
        return m[1]
    if "lora_unet" in base and base.replace("lora_unet", "diffusion_model") in layers:
        return base.replace("lora_unet", "diffusion_model")
    if "lora_te1_text_model" in base:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            if base.replace("lora_te1_text_model", replacement) in layers:
                return base.replace("lora_te1_text_model", replacement)
    return None


@pytest.mark.parametrize("arch", list(Arch))
def test_a1111_matches_every_key(arch: Arch) -> None:
    layers = _a1111_layer_names(arch)
    is_sd2 = "model_transformer_resblocks" in layers
    unmatched = [key for key in _file_keys(arch) if _a1111_match(key, layers, is_sd2) is None]
    assert unmatched == []


@pytest.mark.parametrize("arch", list(Arch))
def test_a1111_puts_each_module_on_the_weight_we_adapt(arch: Arch) -> None:
    from lib_training.formats.lora_keys import lora_targets, targets_by_name

    layers = _a1111_layer_names(arch)
    is_sd2 = "model_transformer_resblocks" in layers
    index = targets_by_name(lora_targets(full_size_shapes(arch), arch))
    prefixes = {
        "model.": "",
        "cond_stage_model.": "",
        "conditioner.embedders.0.": "0_",
        "conditioner.embedders.1.": "1_",
    }
    for name in _names(arch):
        key = index[name].key
        prefix = next(p for p in prefixes if key.startswith(p))
        module = key[len(prefix) :].removesuffix(".weight").removesuffix(".in_proj_weight")
        assert _a1111_match(name, layers, is_sd2) == prefixes[prefix] + module.replace(".", "_"), name


# --- ComfyUI -----------------------------------------------------------------------------------------

_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
             "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
             "self_attn.out_proj": "self_attn_out_proj"}  # fmt: skip


def _comfy_key_map(arch: Arch) -> dict[str, str]:
    """ComfyUI's LoRA key table: kohya module name -> the model key it patches."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from test_unet import diffusers_config

    from lib_training.model.networks.unet import UNetConfig

    key_map: dict[str, str] = {}
    unet = {k: v for k, v in full_size_checkpoint(arch).items() if k.startswith(UNET_PREFIX)}
    for key in unet:
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[len(UNET_PREFIX) : -len(".weight")].replace(".", "_")] = key
    config = {Arch.SD1: UNetConfig.sd15, Arch.SD2: UNetConfig.sd21, Arch.SDXL: UNetConfig.sdxl_base}[arch]()
    ldm_of = {id(t): k for k, t in unet.items()}
    for key, tensor in convert_ldm_unet_checkpoint(unet, diffusers_config(config, unet)).items():
        if key.endswith(".weight"):  # ComfyUI's unet_to_diffusers: diffusers name -> LDM key
            key_map["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = ldm_of[id(tensor)]
    model = full_size_model(arch)
    encoders = {encoder.key: encoder.config.layers for encoder in model.text_encoders}
    for b in range(32):
        for c, lora in _CLIP_MAP.items():
            if b < encoders.get("clip_h", 0):
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora}"] = f"clip_h.{b}.{c}"
            if b < encoders.get("clip_l", 0):
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora}"] = f"clip_l.{b}.{c}"
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora}"] = f"clip_l.{b}.{c}"
            if b < encoders.get("clip_g", 0):
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{lora}"] = f"clip_g.{b}.{c}"
    return key_map


@pytest.mark.parametrize("arch", list(Arch))
def test_comfyui_loads_every_key(arch: Arch) -> None:
    key_map = _comfy_key_map(arch)
    loaded = {f"{name}.{part}" for name in key_map for part in PARTS}  # load_lora's parts per known module
    assert [key for key in _file_keys(arch) if key not in loaded] == []


@pytest.mark.parametrize("arch", list(Arch))
def test_comfyui_patches_the_weight_we_adapt(arch: Arch) -> None:
    key_map = _comfy_key_map(arch)
    from lib_training.formats.lora_keys import lora_targets, targets_by_name

    index = targets_by_name(lora_targets(full_size_shapes(arch), arch))
    for name in _names(arch):
        target = index[name]
        if target.component == "unet":
            assert key_map[name] == target.key, name
        else:  # ComfyUI's CLIP is in HF layout: component.layer.module
            layer, module = re.search(r"layers_(\d+)_(.+)$", name).groups()
            expected = {v: k for k, v in _CLIP_MAP.items()}[module]
            assert key_map[name] == f"{target.component}.{layer}.{expected}", name
