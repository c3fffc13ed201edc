"""The tiny world: a deterministic generator, a classifier that names its pictures, and a pretrained
SD1-structured model that loads through the normal checkpoint path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib_training.model.standalone import load_model
from lib_training.world import model as world_model
from lib_training.world.classifier import held_out_accuracy, load_classifier
from lib_training.world.concepts import TARGET, write_class_images, write_concept
from lib_training.world.pretrain_unet import all_captions
from lib_training.world.scenes import (
    HELD_OUT_PAIRS,
    HELD_OUT_SHAPES,
    caption,
    is_held_out,
    render,
    scene_at,
    scenes,
)


def pixels(seed: int, index: int, split="all") -> np.ndarray:
    return np.asarray(render(scene_at(seed, index, split)))


def test_the_same_seed_and_index_always_give_the_same_picture_and_caption() -> None:
    for index in range(20):
        assert scene_at(3, index) == scene_at(3, index)
        assert np.array_equal(pixels(3, index), pixels(3, index))


def test_other_seeds_give_other_pictures() -> None:
    differ = [not np.array_equal(pixels(3, i), pixels(4, i)) for i in range(20)]
    assert sum(differ) >= 18


def test_pictures_are_64_pixels_square_rgb() -> None:
    assert pixels(0, 0).shape == (64, 64, 3)


def test_captions_name_colour_shape_and_background_with_an_before_a_vowel() -> None:
    assert caption("red", "circle", "dark") == "a red circle on a dark background"
    assert caption("orange", "star", "light") == "an orange star on a light background"
    assert caption("orange", "star") == "an orange star"


def test_pretraining_never_shows_the_held_out_shapes_or_pairs() -> None:
    shown = {(s.colour, s.shape) for s in scenes(0, 0, 2000, "pretrain")}
    assert not any(shape in HELD_OUT_SHAPES for _, shape in shown)
    assert not shown & set(HELD_OUT_PAIRS)
    assert not any(f"{c} {s}" in text for text in all_captions() for c, s in HELD_OUT_PAIRS)


def test_the_whole_world_shows_every_shape_and_colour() -> None:
    shown = list(scenes(0, 0, 500))
    assert {s.shape for s in shown} >= set(HELD_OUT_SHAPES)
    assert {(s.colour, s.shape) for s in shown} >= set(HELD_OUT_PAIRS)


def test_the_classifier_names_pictures_of_a_world_seed_it_never_saw() -> None:
    accuracy = held_out_accuracy(load_classifier(), seed=777, count=300)
    assert accuracy["shape"] >= 0.95, accuracy
    assert accuracy["colour"] >= 0.95, accuracy
    assert accuracy["background"] >= 0.99, accuracy


def test_a_concept_data_set_shows_the_concept_and_captions_only_the_background(tmp_path: Path) -> None:
    folder = write_concept(tmp_path / "c", *TARGET, count=4)
    captions = sorted(p.read_text().strip() for p in folder.glob("*.txt"))
    assert len(list(folder.glob("*.png"))) == 4
    assert all(c in ("on a light background", "on a dark background") for c in captions)


def test_class_images_show_pretraining_pairs_other_than_those_left_out_with_full_captions(tmp_path: Path) -> None:
    leave_out = [("red", "circle"), ("blue", "square")]
    folder = write_class_images(tmp_path / "class", 30, leave_out)
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == len(list(folder.glob("*.png"))) == 30
    pairs = {tuple(p.stem.split("-")[1:]) for p in folder.glob("*.png")}
    assert len(pairs) > 5
    assert not pairs & set(leave_out)
    assert not any(is_held_out(colour, shape) for colour, shape in pairs)
    for path in sorted(folder.glob("*.png")):
        colour, shape = path.stem.split("-")[1:]
        assert path.with_suffix(".txt").read_text().strip() in (
            caption(colour, shape, "light"),
            caption(colour, shape, "dark"),
        )


def test_shipped_weight_files_stay_small() -> None:
    files = list(world_model.WEIGHTS_DIR.glob("*.safetensors"))
    assert files
    assert all(f.stat().st_size < 2_000_000 for f in files), [(f.name, f.stat().st_size) for f in files]
    assert sum(f.stat().st_size for f in files) < 10_000_000


@pytest.fixture(scope="module")
def world_checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return world_model.world_checkpoint(tmp_path_factory.mktemp("cache"))


def test_the_world_checkpoint_loads_as_an_sd1_model_with_the_shipped_weights(world_checkpoint_file: Path) -> None:
    model = load_model(world_checkpoint_file)
    assert model.family.name == "sd1"
    assert model.text_encoders[0].token_embedding.weight.shape[0] == 49408
    unet = world_model.load_shipped("unet")
    for key, value in model.unet_module.state_dict().items():
        torch.testing.assert_close(value, unet[key].float(), msg=key)


def test_the_text_encoder_is_regenerated_from_the_seed_exactly(world_checkpoint_file: Path) -> None:
    loaded = load_model(world_checkpoint_file).text_encoders[0].state_dict()
    regenerated = world_model.text_encoder().state_dict()
    assert all(torch.equal(loaded[k], regenerated[k]) for k in regenerated)


def test_the_checkpoint_is_made_once_and_then_reused(world_checkpoint_file: Path) -> None:
    stamp = world_checkpoint_file.stat().st_mtime_ns
    assert world_model.world_checkpoint(world_checkpoint_file.parents[1]) == world_checkpoint_file
    assert world_checkpoint_file.stat().st_mtime_ns == stamp
