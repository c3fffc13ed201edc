"""LoRA training features: pivotal tuning, block-wise rank and learning rate, text-encoder outputs cached
while the encoders are frozen, masked loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lora_support import FAST, data, make_red_balls, small_lora
from PIL import Image, ImageDraw

from lib_training.errors import ConfigError
from lib_training.formats.tensor_files import open_tensors
from lib_training.methods.lora import LoraMethod
from lib_training.training.run import train


@pytest.fixture(scope="module")
def red_ball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_red_balls(tmp_path_factory.mktemp("red-ball"))


# --- pivotal tuning ---------------------------------------------------------------------------------------------


def _a1111_bundles(keys: list[str]) -> dict[str, dict[str, str]]:
    """How A1111's Lora extension reads bundle_emb keys: token -> {"string_to_param": "*"} or {"clip_l": ...}."""
    bundles: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, rest = key.split(".", 1)
        if prefix != "bundle_emb":
            continue
        token, part = rest.split(".", 1)
        if part.split(".")[0] == "string_to_param":
            bundles.setdefault(token, {})["string_to_param"] = part.split(".", 1)[1]
        else:
            bundles.setdefault(token, {})[part] = part
    return bundles


def test_pivotal_tuning_trains_both_parts_and_bundles_the_word(tiny_sd1, red_ball, tmp_path) -> None:
    from lib_training.methods.embedding import initial_vectors

    method = small_lora(pivotal_token="zqx", pivotal_vectors=2, pivotal_init="ball")
    start = initial_vectors(tiny_sd1.text_encoders[0], "ball", 2)
    result = train(tiny_sd1, method, data(red_ball), dataclasses.replace(FAST, steps=3), tmp_path)
    with open_tensors(result.result) as source:
        keys = source.keys()
        bundled = source.get("bundle_emb.zqx.string_to_param.*")
    assert _a1111_bundles(keys) == {"zqx": {"string_to_param": "*"}}
    assert bundled.shape == start.shape and not torch.equal(bundled, start)
    loaded = LoraMethod.load(result.result, tiny_sd1)
    assert any(module.up.any() for module in loaded.network.lora.values())
    with loaded.apply_for_generation(tiny_sd1, 1.0) as embeddings:
        assert torch.equal(embeddings["zqx"]["clip_l"].cpu(), bundled)


def test_sdxl_bundles_a_clip_l_and_a_clip_g_part(tiny_sdxl, red_ball, tmp_path) -> None:
    from lib_training.formats.embedding_files import read_embedding

    method = small_lora(pivotal_token="zqx", embedding_file=True, name="ball-lora")
    result = train(tiny_sdxl, method, data(red_ball), dataclasses.replace(FAST, steps=2), tmp_path)
    with open_tensors(result.result) as source:
        keys = source.keys()
        assert source.shape("bundle_emb.zqx.clip_g")[1] == tiny_sdxl.text_encoder("clip_g").width
    assert _a1111_bundles(keys) == {"zqx": {"clip_l": "clip_l", "clip_g": "clip_g"}}
    own = read_embedding(tmp_path / "zqx.safetensors", expect={"clip_l": 64, "clip_g": 128})
    assert set(own.vectors) == {"clip_l", "clip_g"}


def test_pivotal_word_missing_from_the_prompts_is_refused(tiny_sd1, red_ball, tmp_path) -> None:
    with pytest.raises(ConfigError, match="no training prompt contains the pivotal word 'qqq'"):
        train(tiny_sd1, small_lora(pivotal_token="qqq"), data(red_ball), FAST, tmp_path)


def test_pivotal_resume_continues_the_embedding_exactly(tiny_sd1, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=4)
    straight = train(tiny_sd1, small_lora(pivotal_token="zqx"), data(red_ball), loop, tmp_path / "a")
    calls = iter(range(100))
    stop = lambda: next(calls) >= 2  # noqa: E731
    train(tiny_sd1, small_lora(pivotal_token="zqx"), data(red_ball), loop, tmp_path / "b", should_stop=stop)
    resumed = train(tiny_sd1, small_lora(pivotal_token="zqx"), data(red_ball), loop, tmp_path / "b", resume=True)
    with open_tensors(straight.result) as a, open_tensors(resumed.result) as b:
        key = "bundle_emb.zqx.string_to_param.*"
        assert torch.equal(a.get(key), b.get(key))


# --- block-wise rank and learning rate ----------------------------------------------------------------------------

SD1_BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]


def test_block_ranks_set_each_blocks_rank_and_zero_leaves_it_out(tiny_sd1) -> None:
    ranks = {block: 4 for block in SD1_BLOCKS} | {"IN01": 2, "M00": 0}
    method = small_lora(block_ranks=",".join(str(ranks[b]) for b in SD1_BLOCKS))
    method.attach(tiny_sd1)
    names = dict(method.network.lora.items())
    method.detach()
    assert names["lora_unet_down_blocks_0_attentions_0_proj_in"].rank == 2  # input_blocks.1: IN01
    assert names["lora_unet_down_blocks_0_attentions_1_proj_in"].rank == 4  # IN02
    assert not any(name.startswith("lora_unet_mid_block") for name in names)


def test_block_learning_rates_scale_the_runs_rate_per_block(tiny_sd1, red_ball, tmp_path) -> None:
    factors = {block: 1.0 for block in SD1_BLOCKS} | {"IN01": 0.0, "OUT11": 0.5}
    method = small_lora(block_lrs=",".join(str(factors[b]) for b in SD1_BLOCKS))
    train(tiny_sd1, method, data(red_ball), dataclasses.replace(FAST, steps=2, lr="0.002"), tmp_path)
    groups = {group.name: group.lr for group in method.param_groups()}
    assert groups["unet.IN01"] == "0" and groups["unet.OUT11"] == "0.001" and groups["unet.M00"] == "0.002"
    frozen = method.network.lora["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert not frozen.up.any()  # learning rate 0: still at its start
    assert method.network.lora["lora_unet_mid_block_attentions_0_proj_in"].up.any()


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"block_ranks": "4," * 19 + "4"}, "need 26 comma-separated values"), ({"block_ranks": "in_to_out"}, "whole")],
)
def test_block_settings_that_do_not_fit_the_family_are_refused(settings, message, tiny_sd1) -> None:
    method = small_lora(**settings)
    with pytest.raises(ConfigError, match=message):
        method.attach(tiny_sd1)
    method.detach()


def test_block_settings_of_no_family_are_refused_at_once() -> None:
    with pytest.raises(ConfigError, match="block_lrs needs 26 comma-separated values"):
        small_lora(block_lrs="1,1,1")


# --- text-encoder outputs cached while the encoders are frozen -----------------------------------------------------


def test_frozen_text_encoders_encode_each_prompt_once(tiny_sdxl, red_ball, tmp_path, monkeypatch) -> None:
    calls = []
    original = type(tiny_sdxl).encode_prompts

    def counting(self, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(type(tiny_sdxl), "encode_prompts", counting)
    train(tiny_sdxl, small_lora(), data(red_ball), dataclasses.replace(FAST, steps=9), tmp_path)
    assert len(calls) == 3 and len({p for batch in calls for p in batch}) == 3  # three captions


def test_cached_text_outputs_train_exactly_as_encoding_every_step(tiny_sdxl, red_ball, tmp_path, monkeypatch) -> None:
    loop = dataclasses.replace(FAST, steps=4)
    cached = train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "a")
    monkeypatch.setattr(LoraMethod, "trains_text_encoders", property(lambda self: True))
    encoded = train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "b")
    with open_tensors(cached.result) as a, open_tensors(encoded.result) as b:
        keys = a.keys()
        assert all(torch.equal(a.get(k), b.get(k)) for k in keys)


# --- masked loss ----------------------------------------------------------------------------------------------------


@pytest.fixture
def masked_balls(red_ball, tmp_path) -> Path:
    """The red-ball images, each with a NAME.mask.png: white on the right half, black on the left."""
    import shutil

    folder = tmp_path / "masked"
    shutil.copytree(red_ball, folder)
    for image in sorted(folder.glob("*.png")):
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((32, 0, 63, 63), fill=255)
        mask.save(image.with_name(image.stem + ".mask.png"))
    return folder


def test_mask_files_weight_the_loss_and_are_not_training_images(masked_balls) -> None:
    from lib_training.dataset import TrainingDataset

    dataset = TrainingDataset(data(masked_balls, alpha_weight=True), name="zqx")
    assert len(dataset.samples) == 3 and dataset.other_files == []
    batch = dataset.batch(next(dataset.sampler(1)), load_images=False)
    weight = batch.weights[0, 0]  # [h, w] at latent resolution
    assert weight[:, :4].eq(0).all() and weight[:, 4:].eq(1).all()


def test_black_masks_train_nothing(masked_balls, tiny_sd1, tmp_path) -> None:
    for mask in masked_balls.glob("*.mask.png"):
        Image.new("L", (64, 64), 0).save(mask)
    method = small_lora()
    loop = dataclasses.replace(FAST, steps=2)
    train(tiny_sd1, method, data(masked_balls, alpha_weight=True), loop, tmp_path / "run")
    assert not any(module.up.any() for module in method.network.lora.values())


# --- validation loss on held-out images ---------------------------------------------------------------


def test_held_out_images_never_train(red_ball) -> None:
    from lib_training.dataset import TrainingDataset

    dataset = TrainingDataset(data(red_ball, validation_images=1, seed=3), name="zqx")
    held_out = dataset.validation[0]
    assert len(dataset.samples) == 2 and held_out not in dataset.samples
    sampler = dataset.sampler(1)
    drawn = {dataset.record(item).relpath for _ in range(12) for item in next(sampler).items}
    assert held_out.relpath not in drawn and len(drawn) == 2
    assert held_out.view(False) in dataset.views()  # its latents are cached with the others


def test_validation_loss_is_measured_every_n_steps_and_at_the_end(tiny_sd1, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=6, validate_every=2, lr="0.003")
    result = train(tiny_sd1, small_lora(), data(red_ball, validation_images=1), loop, tmp_path)
    rows = (tmp_path / "validation.csv").read_text().splitlines()
    assert rows[0] == "step,validation_loss" and [row.split(",")[0] for row in rows[1:]] == ["2", "4", "6"]
    assert result.validation_loss == pytest.approx(float(rows[-1].split(",")[1]), rel=1e-5)


def test_holding_out_every_image_is_refused(tiny_sd1, red_ball, tmp_path) -> None:
    from lib_training.dataset import DatasetError

    with pytest.raises(DatasetError, match="would leave no training image"):
        train(tiny_sd1, small_lora(), data(red_ball, validation_images=3), FAST, tmp_path)


# --- regularization (class) images -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def balls(tmp_path_factory) -> Path:
    """Class images: plain balls of other colours, captioned "a ball"."""
    folder = tmp_path_factory.mktemp("balls")
    for i, colour in enumerate([(40, 40, 220), (40, 200, 40)]):
        picture = Image.new("RGB", (64, 64), (230, 230, 230))
        ImageDraw.Draw(picture).ellipse((12, 12, 52, 52), fill=colour)
        picture.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a ball")
    return folder


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_tensors(path) as source:
        keys = source.keys()
        return {key: source.get(key) for key in keys}


def test_class_images_at_prior_weight_zero_train_exactly_as_without(tiny_sd1, red_ball, balls, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=3)
    plain = train(tiny_sd1, small_lora(), data(red_ball), loop, tmp_path / "a")
    weightless = train(tiny_sd1, small_lora(), data(red_ball, class_path=str(balls), prior_loss_weight=0.0), loop,
                       tmp_path / "b")  # fmt: skip
    weighted = train(tiny_sd1, small_lora(), data(red_ball, class_path=str(balls)), loop, tmp_path / "c")
    a, b, c = (_lora_tensors(r.result) for r in (plain, weightless, weighted))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the class branch leaves the instance path alone
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and at weight 1 it trains


def test_resume_with_class_images_is_bit_identical(tiny_sd1, red_ball, balls, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=4)
    settings = data(red_ball, class_path=str(balls))
    straight = train(tiny_sd1, small_lora(), settings, loop, tmp_path / "a")
    calls = iter(range(100))
    stop = lambda: next(calls) >= 2  # noqa: E731
    train(tiny_sd1, small_lora(), settings, loop, tmp_path / "b", should_stop=stop)
    resumed = train(tiny_sd1, small_lora(), settings, loop, tmp_path / "b", resume=True)
    a, b = _lora_tensors(straight.result), _lora_tensors(resumed.result)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_class_images_are_named_before_training(tiny_sd1, red_ball, tmp_path) -> None:
    from lib_training.dataset import DatasetError

    empty = tmp_path / "no-class-images"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"regularization \(class\) images: .*contains no images"):
        train(tiny_sd1, small_lora(), data(red_ball, class_path=str(empty)), FAST, tmp_path / "out")


# --- multi-resolution noise ---------------------------------------------------------------------------------------


def test_multires_noise_adds_coarse_structure_at_unit_std_from_its_seed() -> None:
    from lib_training.training.loss import multires_noise

    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    a = multires_noise(noise, 6, 0.3, torch.Generator().manual_seed(1))
    b = multires_noise(noise, 6, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == noise.shape
    assert abs(a.std().item() - 1) < 1e-5 and not torch.allclose(a, noise / noise.std())
    coarse = lambda t: torch.nn.functional.avg_pool2d(t, 8).std().item()  # noqa: E731  (8x8 cell means)
    assert coarse(a) > 1.2 * coarse(noise / noise.std())  # more low-frequency energy than white noise
    assert multires_noise(noise, 0, 0.3, torch.Generator()) is noise


def test_training_with_multires_noise(tiny_sd1, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=2, multires_noise_iterations=6)
    result = train(tiny_sd1, small_lora(), data(red_ball), loop, tmp_path)
    assert result.step == 2 and result.loss is not None
