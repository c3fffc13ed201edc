"""The module map of our standalone model: kohya's module set on the full-size models (meta device,
each built once per family), and the live layer behind every name on tiny models with real weights.

How the hosts' adapters build the same map: tests/hosts/test_webui_module_map.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from fullsize import full_size_model, full_size_shapes
from torch import nn

from lib_training.formats.detection import UNET_PREFIX
from lib_training.formats.family import Arch
from lib_training.formats.fingerprint import hooks_snapshot, weights_fingerprint
from lib_training.formats.lora_keys import lora_targets
from lib_training.model.diffusion import DiffusionModel
from lib_training.model.module_map import ModuleEntry
from lib_training.model.standalone import StandaloneModel
from lib_training.model.tiny import make_tiny


@functools.cache
def tiny_model(arch: str) -> StandaloneModel:
    return make_tiny(arch, seed=0)


KOHYA_COUNTS = [(Arch.SD1, 72, 192), (Arch.SD2, 144, 192), (Arch.SDXL, 264, 722)]


@pytest.mark.parametrize(("arch", "text", "unet"), KOHYA_COUNTS)
def test_default_entries_are_kohyas_plain_lora_modules(arch: Arch, text: int, unet: int) -> None:
    # kohya's plain LoRA: SD1.5 72 text-encoder + 192 UNet modules, SDXL 264 + 722; SD2.1 144 + 192
    entries = full_size_model(arch).module_map().select(default=True)
    assert sum(e.component != "unet" for e in entries) == text
    assert sum(e.component == "unet" for e in entries) == unet
    kohya = {t.name for t in lora_targets(full_size_shapes(arch), arch) if t.default}
    assert {e.kohya for e in entries} == kohya


@pytest.mark.parametrize("arch", list(Arch))
def test_every_layer_the_checkpoint_has_is_in_the_map_once(arch: Arch) -> None:
    module_map = full_size_model(arch).module_map()
    names = [name for e in module_map for name in (e.kohya, *e.aliases)]
    assert len(names) == len(set(names))
    assert sorted(e.kohya for e in module_map) == sorted(t.name for t in lora_targets(full_size_shapes(arch), arch))


def _owner(model: DiffusionModel, entry: ModuleEntry) -> nn.Module:
    return model.modules[entry.component].get_submodule(entry.path)


@pytest.mark.parametrize("arch", list(Arch))
def test_each_entry_is_the_live_module_with_the_shape_of_its_checkpoint_key(arch: Arch) -> None:
    model = full_size_model(arch)
    shapes = full_size_shapes(arch)
    for entry in model.module_map():
        assert _owner(model, entry) is entry.module, entry.kohya
        if entry.component == "unet":
            assert entry.key == f"{UNET_PREFIX}{entry.path}.weight"
        kernel = () if entry.kernel is None else entry.kernel
        if entry.rows is not None:
            assert isinstance(entry.module.in_proj_weight, nn.Parameter)
        else:
            assert isinstance(entry.module, nn.Linear if entry.kernel is None else nn.Conv2d)
        assert tuple(entry.weight().shape) == (entry.out_features, entry.in_features, *kernel), entry.kohya
        stored = shapes[entry.key]
        if entry.key_rows is not None:
            start, stop = entry.key_rows
            stored = (stop - start, *stored[1:])
        assert stored == tuple(entry.weight().shape), entry.kohya


def test_open_clip_q_k_v_are_row_ranges_of_the_fused_projection() -> None:
    module_map = full_size_model(Arch.SDXL).module_map()
    q, k, v = (module_map.by_kohya(f"lora_te2_text_model_encoder_layers_3_self_attn_{p}_proj") for p in "qkv")
    assert q.module is k.module is v.module
    assert isinstance(q.module, nn.MultiheadAttention)
    assert [q.rows, k.rows, v.rows] == [(0, 1280), (1280, 2560), (2560, 3840)]
    assert q.key == "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    assert q.key_rows == q.rows
    assert module_map.by_key(q.key, rows=(1280, 2560)) is k
    with pytest.raises(KeyError, match="shared by"):
        module_map.by_key(q.key)


def test_clip_l_keys_are_hf_while_our_tower_fuses_q_k_v() -> None:
    entry = full_size_model(Arch.SD1).module_map().by_kohya("lora_te_text_model_encoder_layers_0_self_attn_v_proj")
    assert entry.key == "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight"
    assert entry.key_rows is None
    assert entry.rows == (1536, 2304)
    assert entry.kinds >= {"text_attention", "attn_v", "linear"}


def test_sd1_cross_attention_keys_are_the_16_to_k_linears_of_the_text_width() -> None:
    model = full_size_model(Arch.SD1)
    entries = model.module_map().select(kinds={"cross_attn", "attn_k"})
    assert len(entries) == 16
    for entry in entries:
        assert isinstance(entry.module, nn.Linear)
        assert entry.in_features == entry.module.in_features == 768
        assert entry.path.endswith(".attn2.to_k")
        assert entry.default and not entry.conv and entry.component == "unet"


def test_select_combines_component_kinds_and_sets() -> None:
    module_map = full_size_model(Arch.SDXL).module_map()
    assert len(module_map.select(component="clip_g", kinds={"attn_q"})) == 32
    locon = module_map.select(conv=True)
    assert all(e.kinds & {"resblock", "sampler"} for e in locon)
    assert {e.kernel for e in module_map.select(kinds={"sampler"})} == {(3, 3)}
    assert len(module_map.select(kinds={"conv_in"})) == len(module_map.select(kinds={"conv_out"})) == 1
    with pytest.raises(ValueError, match="unknown module kinds"):
        module_map.select(kinds={"attention"})


def test_unet_names_accept_either_spelling() -> None:
    module_map = full_size_model(Arch.SD1).module_map()
    entry = module_map.by_kohya("lora_unet_input_blocks_4_0_in_layers_2")
    assert entry.kohya == "lora_unet_down_blocks_1_resnets_0_conv1"
    assert entry.kinds >= {"resblock", "res_conv1", "conv3x3", "input"} and entry.conv and not entry.default
    assert module_map.by_key(entry.key) is entry


def test_unknown_name_is_a_key_error_naming_it() -> None:
    module_map = full_size_model(Arch.SD1).module_map()
    with pytest.raises(KeyError, match=r"lora_unet_down_blocks_0_attentions_0_proj_inn.*did you mean"):
        module_map.by_kohya("lora_unet_down_blocks_0_attentions_0_proj_inn")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_each_entry_weight_is_the_checkpoint_tensor_at_its_key(arch: str) -> None:
    """On a tiny model with random weights, so a layer mapped to the wrong key shows."""
    model = tiny_model(arch)
    stored = model.checkpoint_state_dict()
    for entry in model.module_map():
        want = stored[entry.key]
        if entry.key_rows is not None:
            want = want[entry.key_rows[0] : entry.key_rows[1]]
        assert torch.equal(entry.weight(), want), entry.kohya


def test_building_the_map_only_reads_and_is_cached() -> None:
    model = make_tiny("sd1", seed=1)
    before = (weights_fingerprint(model.modules), hooks_snapshot(model.modules))
    first = model.module_map()
    assert (weights_fingerprint(model.modules), hooks_snapshot(model.modules)) == before
    assert model.module_map() is first
