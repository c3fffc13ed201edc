"""Block weights: every key of the full-size SD1, SD2 and SDXL checkpoints has its block."""

from __future__ import annotations

import pytest
from fullsize import full_size_shapes

from lib_training.errors import ConfigError
from lib_training.formats.detection import TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX
from lib_training.formats.family import Arch
from lib_training.merge.blocks import PRESETS, block_names, block_of, parse_blocks, preset


@pytest.mark.parametrize(("arch", "count"), [(Arch.SD1, 26), (Arch.SD2, 26), (Arch.SDXL, 20)])
def test_every_unet_key_maps_to_one_block_and_every_block_is_used(arch: Arch, count: int) -> None:
    shapes = full_size_shapes(arch)
    names = block_names(arch)
    assert len(names) == count
    unet_blocks = {block_of(key, arch) for key in shapes if key.startswith(UNET_PREFIX)}
    assert unet_blocks == set(names[1:])


@pytest.mark.parametrize("arch", list(Arch))
def test_text_encoder_keys_are_base_and_vae_keys_have_no_block(arch: Arch) -> None:
    shapes = full_size_shapes(arch)
    for key in shapes:
        if any(key.startswith(slot.prefix) for slot in TEXT_ENCODERS[arch]):
            assert block_of(key, arch) == "BASE", key
        elif key.startswith(VAE_PREFIX):
            assert block_of(key, arch) is None, key


@pytest.mark.parametrize(("arch", "last"), [(Arch.SD1, "OUT11"), (Arch.SDXL, "OUT08")])
def test_embeddings_go_with_in00_and_the_final_layers_with_the_last_out_block(arch: Arch, last: str) -> None:
    assert block_of(UNET_PREFIX + "time_embed.0.weight", arch) == "IN00"
    assert block_of(UNET_PREFIX + "out.2.weight", arch) == last
    assert block_of(UNET_PREFIX + "input_blocks.4.1.proj_in.weight", arch) == "IN04"
    assert block_of(UNET_PREFIX + "middle_block.1.proj_out.bias", arch) == "M00"
    assert block_of(UNET_PREFIX + "output_blocks.5.1.conv.weight", arch) == "OUT05"


def test_sdxl_label_embedding_goes_with_in00() -> None:
    assert block_of(UNET_PREFIX + "label_emb.0.2.weight", Arch.SDXL) == "IN00"


def test_a_block_beyond_the_layout_is_an_error() -> None:
    with pytest.raises(ConfigError, match="block 9"):
        block_of(UNET_PREFIX + "input_blocks.9.0.in_layers.2.weight", Arch.SDXL)


def test_26_values_give_each_block_its_value() -> None:
    values = [i / 100 for i in range(26)]
    weights = parse_blocks(",".join(map(str, values)), Arch.SD1)
    assert list(weights) == list(block_names(Arch.SD1))
    assert weights["BASE"] == 0.0 and weights["IN05"] == 0.06 and weights["M00"] == 0.13 and weights["OUT11"] == 0.25


def test_the_wrong_number_of_values_names_the_layout() -> None:
    with pytest.raises(
        ConfigError, match=r"SDXL need 20 comma-separated values .*BASE, IN00-IN08, M00, OUT00-OUT08.*got 26"
    ):
        parse_blocks(",".join(["1"] * 26), Arch.SDXL)
    with pytest.raises(ConfigError, match=r"SD1 need 26 .*got 3"):
        parse_blocks("1, 0.5, 0", Arch.SD1)


def test_a_value_that_is_not_a_number_is_named() -> None:
    with pytest.raises(ConfigError, match="'x' is not a number"):
        parse_blocks(",".join(["1"] * 25 + ["x"]), Arch.SD1)


def test_an_empty_text_means_no_block_weights() -> None:
    assert parse_blocks("  ", Arch.SD1) == {}


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_set_every_unet_block_within_zero_and_one(arch: Arch, name: str) -> None:
    weights = parse_blocks(name, arch)
    assert list(weights) == list(block_names(arch)[1:])
    assert all(0.0 <= value <= 1.0 for value in weights.values())


def test_ramp_presets_run_from_in00_to_the_last_out_block() -> None:
    ramp = preset("in_to_out", Arch.SD1)
    assert ramp["IN00"] == 0.0 and ramp["M00"] == 0.5 and ramp["OUT11"] == 1.0
    v = preset("v_shape", Arch.SDXL)
    assert v["IN00"] == 1.0 and v["M00"] == 0.0 and v["OUT08"] == 1.0


def test_an_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match="unknown block preset 'nope'; presets are: in_to_out"):
        parse_blocks("nope", Arch.SD1)
