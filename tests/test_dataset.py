"""The training dataset: scanning, captions, templates, sizes, alpha weights, summary and errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_training.dataset import (
    DatasetConfig,
    DatasetError,
    TemplateError,
    TrainingDataset,
    builtin_templates,
)
from lib_training.dataset.buckets import bucket_resolutions
from lib_training.dataset.captions import augment_caption, split_tags
from lib_training.dataset.templates import fill_template, load_template
from lib_training.errors import ConfigError, UserError


def make_image(
    path: Path,
    width: int = 64,
    height: int = 64,
    color=(200, 30, 30),
    mode: str = "RGB",
    fmt: str | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = (*color, 255) if mode == "RGBA" else color
    Image.new(mode, (width, height), fill).save(path, format=fmt)
    return path


def write_template(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "template.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def dataset(folder: Path, name: str = "tok", **options) -> TrainingDataset:
    options.setdefault("size", 64)
    return TrainingDataset(DatasetConfig(folder, **options), name)


# --- scanning and captions --------------------------------------------------------------------------


def test_images_in_subfolders_are_found_in_sorted_order(tmp_path):
    for name in ["b.png", "sub/a.jpg", "a.webp", "sub/deeper/c.jpeg"]:
        make_image(tmp_path / name)
    ds = dataset(tmp_path)
    assert [record.relpath for record in ds.samples] == ["a.webp", "b.png", "sub/a.jpg", "sub/deeper/c.jpeg"]


def test_caption_comes_from_txt_file_beside_image(tmp_path):
    make_image(tmp_path / "00001-file name words.png")
    (tmp_path / "00001-file name words.txt").write_text("a cat, sitting\n", encoding="utf-8")
    (record,) = dataset(tmp_path).samples
    assert (record.caption, record.caption_source) == ("a cat, sitting", "file")


def test_caption_from_file_name_strips_leading_digits_and_dashes(tmp_path):
    make_image(tmp_path / "00012-a red car.png")
    (record,) = dataset(tmp_path).samples
    assert (record.caption, record.caption_source) == ("a red car", "filename")


def test_caption_extension_is_configurable(tmp_path):
    make_image(tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("from txt", encoding="utf-8")
    (tmp_path / "img.caption").write_text("from caption", encoding="utf-8")
    (record,) = dataset(tmp_path, caption_extension=".caption").samples
    assert record.caption == "from caption"


def test_non_image_files_are_ignored_but_counted(tmp_path):
    make_image(tmp_path / "one.png")
    (tmp_path / "one.txt").write_text("caption", encoding="utf-8")
    (tmp_path / "notes.md").write_text("hello", encoding="utf-8")
    (tmp_path / "meta.json").write_text("{}", encoding="utf-8")
    ds = dataset(tmp_path)
    assert len(ds.samples) == 1
    assert ds.summary().other_files == 2  # the caption file is not counted as ignored


# --- templates and prompts --------------------------------------------------------------------------


def test_prompt_fills_name_and_filewords(tmp_path):
    make_image(tmp_path / "a dog.png")
    ds = dataset(tmp_path, name="mytoken", template=write_template(tmp_path, "a photo of [name], [filewords]"))
    assert ds.sample(0, epoch=0, load_image=False).prompt == "a photo of mytoken, a dog"


def test_builtin_templates_are_shipped_and_none_is_just_picture():
    assert {"subject", "subject_filewords", "style", "style_filewords", "none"} <= set(builtin_templates())
    assert load_template("none").lines == ("picture",)
    assert all("[filewords]" in line for line in load_template("subject_filewords").lines)
    assert all("[name]" in line for line in load_template("style").lines)


def test_template_blank_lines_are_ignored(tmp_path):
    template = load_template(write_template(tmp_path, "", "first [name]", "   ", "second [name]", ""))
    assert template.lines == ("first [name]", "second [name]")


def test_each_sample_picks_a_seeded_template_line(tmp_path):
    make_image(tmp_path / "x.png")
    template = write_template(tmp_path, "one [name]", "two [name]", "three [name]")
    ds = dataset(tmp_path, template=template, repeats=60, seed=3)
    prompts = [ds.sample(item, epoch=0, load_image=False).prompt for item in range(len(ds))]
    assert set(prompts) == {"one tok", "two tok", "three tok"}
    again = dataset(tmp_path, template=template, repeats=60, seed=3)
    assert prompts == [again.sample(item, epoch=0, load_image=False).prompt for item in range(len(ds))]


def test_random_choices_differ_between_epochs(tmp_path):
    make_image(tmp_path / "x.png")
    template = write_template(tmp_path, "one [name]", "two [name]", "three [name]")
    ds = dataset(tmp_path, template=template, flip=True, repeats=20)
    epochs = [[ds.sample(i, epoch, load_image=False) for i in range(len(ds))] for epoch in (0, 1)]
    prompts = [[s.prompt for s in samples] for samples in epochs]
    flips = [[s.view.flip for s in samples] for samples in epochs]
    assert prompts[0] != prompts[1]
    assert flips[0] != flips[1]


def test_empty_caption_removes_filewords_with_its_comma():
    assert fill_template("a photo of a [name], [filewords]", "tok", "") == "a photo of a tok"
    assert fill_template("[filewords], [name] style", "tok", "") == "tok style"
    assert fill_template("a painting of [filewords], by [name]", "tok", "") == "a painting of by tok"


# --- caption augmentation ---------------------------------------------------------------------------

TAGS = "one, two, three, four, five, six, seven, eight"


def test_shuffle_keeps_the_first_n_tags_in_place():
    original = split_tags(TAGS)
    orders = set()
    for seed in range(50):
        tags = split_tags(augment_caption(TAGS, random.Random(seed), shuffle=True, keep=2))
        assert tags[:2] == original[:2]
        assert sorted(tags) == sorted(original)
        orders.add(tuple(tags))
    assert len(orders) > 10  # the other tags really move


def test_tag_dropout_removes_tags_at_its_rate_but_never_kept_ones():
    original = split_tags(TAGS)
    dropped = total = 0
    for seed in range(500):
        tags = split_tags(augment_caption(TAGS, random.Random(seed), keep=1, tag_dropout=0.3))
        assert tags[0] == original[0]
        dropped += len(original) - len(tags)
        total += len(original) - 1
    assert abs(dropped / total - 0.3) < 0.03  # 3500 draws: sd ~0.008


def test_caption_dropout_empties_caption_at_its_rate_and_keeps_name(tmp_path):
    make_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("red, shiny", encoding="utf-8")
    template = write_template(tmp_path, "photo of [name], [filewords]")
    ds = dataset(tmp_path, template=template, repeats=1000, caption_dropout=0.25)
    prompts = [ds.sample(item, epoch=0, load_image=False).prompt for item in range(len(ds))]
    assert set(prompts) == {"photo of tok", "photo of tok, red, shiny"}
    rate = prompts.count("photo of tok") / len(prompts)
    assert abs(rate - 0.25) < 0.05  # 1000 draws: sd ~0.014


def test_caption_is_unchanged_without_shuffle_or_dropout():
    caption = "a man,  standing , in rain"
    assert augment_caption(caption, random.Random(0)) == caption


# --- repeats and flips ------------------------------------------------------------------------------


def test_repeats_show_each_image_n_times_per_epoch(tmp_path):
    for name in ["a.png", "b.png", "c.png"]:
        make_image(tmp_path / name)
    ds = dataset(tmp_path, repeats=4)
    sampler = ds.sampler(batch_size=2)
    items = [item for _ in range(len(sampler)) for item in next(sampler).items]
    counts = {record.relpath: 0 for record in ds.samples}
    for item in items:
        counts[ds.record(item).relpath] += 1
    assert len(ds) == 12
    assert counts == {"a.png": 4, "b.png": 4, "c.png": 4}


def _half_red_half_blue(path: Path) -> Path:
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 64))
    img.save(path)
    return path


def test_flip_mirrors_the_image_for_about_half_the_samples(tmp_path):
    _half_red_half_blue(tmp_path / "x.png")
    ds = dataset(tmp_path, flip=True, repeats=200)
    flips = [ds.sample(item, epoch=0, load_image=False).view.flip for item in range(len(ds))]
    assert abs(sum(flips) / len(flips) - 0.5) < 0.1
    flipped = ds.sample(flips.index(True), epoch=0)
    plain = ds.sample(flips.index(False), epoch=0)
    assert plain.image[0, 0, 0] == 1.0 and plain.image[2, 0, 0] == -1.0  # red on the left
    assert torch.equal(flipped.image, plain.image.flip(-1))


def test_flip_off_never_mirrors(tmp_path):
    make_image(tmp_path / "x.png")
    ds = dataset(tmp_path, repeats=50)
    assert not any(ds.sample(item, epoch=0, load_image=False).view.flip for item in range(len(ds)))


# --- sizes ------------------------------------------------------------------------------------------


def test_image_tensor_is_float_in_minus_one_to_one(tmp_path):
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 64))
    img.save(tmp_path / "x.png")
    image = dataset(tmp_path).sample(0, epoch=0).image
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert image.min() == -1.0 and image.max() == 1.0


def test_resize_scales_shorter_side_and_crops_the_centre(tmp_path):
    img = Image.new("RGB", (128, 96), (0, 0, 0))
    img.paste((255, 255, 255), (60, 0, 68, 96))  # white stripe at the centre column
    img.save(tmp_path / "wide.png")
    ds = dataset(tmp_path, size=64)
    sample = ds.sample(0, epoch=0)
    resized_h, resized_w = sample.view.resized_size
    assert sample.image.shape == (3, 64, 64)
    assert resized_h == 64 and resized_w == round(128 * 64 / 96)
    assert sample.crop == (0, (resized_w - 64) // 2)
    assert sample.original_size == (96, 128)
    assert sample.image[:, :, 31:33].mean() > 0.5  # the centre stays in the middle
    assert sample.image[:, :, :8].max() == -1.0


def test_flipped_sample_reports_mirrored_crop_offset(tmp_path):
    make_image(tmp_path / "x.png", width=131, height=64)  # odd margin: left and right differ
    ds = dataset(tmp_path, size=64, flip=True, repeats=40)
    samples = [ds.sample(item, epoch=0, load_image=False) for item in range(len(ds))]
    plain = next(s for s in samples if not s.view.flip)
    flipped = next(s for s in samples if s.view.flip)
    assert plain.crop == (0, 33)
    assert flipped.crop == (0, 131 - 33 - 64)


def test_buckets_are_multiples_of_64_with_area_about_size_squared():
    buckets = bucket_resolutions(1024, 256, 2048)
    assert (1024, 1024) in buckets
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert 256 <= height <= 2048 and 256 <= width <= 2048
        assert 1024 * 1024 * 0.85 < height * width <= 1024 * 1024
    assert {(h, w) for h, w in buckets} == {(w, h) for h, w in buckets}  # every shape both ways


def test_wide_tall_and_square_images_get_matching_buckets(tmp_path):
    make_image(tmp_path / "wide.png", width=512, height=256)
    make_image(tmp_path / "tall.png", width=256, height=512)
    make_image(tmp_path / "square.png", width=300, height=300)
    ds = dataset(tmp_path, size=256, buckets=True, min_bucket=128, max_bucket=512)
    # buckets for 256: 512x128, 448x128, 384x128, 320x192, 256x256 (w x h) and the tall ones;
    # 2:1 is closest to 320x192 (ratio 1.67) on a log scale.
    targets = {record.relpath: record.target_size for record in ds.samples}
    assert targets == {"square.png": (256, 256), "tall.png": (320, 192), "wide.png": (192, 320)}
    for record in ds.samples:
        sample = ds.sample(ds.samples.index(record), epoch=0)
        assert sample.image.shape[1:] == record.target_size


def test_bucket_images_are_not_enlarged_when_they_cover_the_bucket(tmp_path):
    make_image(tmp_path / "wide.png", width=640, height=320)
    (record,) = dataset(tmp_path, size=256, buckets=True, min_bucket=128, max_bucket=512).samples
    assert record.placement.scale < 1.0
    assert record.placement.resized[0] >= record.target_size[0]
    assert record.placement.resized[1] >= record.target_size[1]


def test_no_upscale_trains_small_images_at_their_own_size(tmp_path):
    make_image(tmp_path / "small.png", width=200, height=150)
    make_image(tmp_path / "big.png", width=600, height=600)
    ds = dataset(tmp_path, size=256, buckets=True, no_upscale=True, min_bucket=128, max_bucket=512)
    targets = {record.relpath: record.target_size for record in ds.samples}
    assert targets == {"big.png": (256, 256), "small.png": (128, 192)}  # 150 -> 128, 200 -> 192
    assert all(record.placement.scale <= 1.0 for record in ds.samples)


def test_without_no_upscale_small_images_are_enlarged_and_listed(tmp_path):
    make_image(tmp_path / "small.png", width=200, height=150)
    ds = dataset(tmp_path, size=256, buckets=True, min_bucket=128, max_bucket=512)
    (record,) = ds.samples
    assert record.placement.scale > 1.0
    assert [name for name, _ in ds.summary().upscaled] == ["small.png"]
    assert "small.png" in str(ds.summary())


def test_no_upscale_without_buckets_uses_smaller_square(tmp_path):
    make_image(tmp_path / "small.png", width=150, height=140)
    (record,) = dataset(tmp_path, size=256, no_upscale=True).samples
    assert record.target_size == (128, 128)
    assert record.placement.scale <= 1.0


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (96, 64), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the picture is 64 wide and 96 tall
    img.save(tmp_path / "rotated.jpg", exif=exif)
    (record,) = dataset(tmp_path).samples
    assert record.size == (96, 64)


# --- alpha ------------------------------------------------------------------------------------------


def test_alpha_becomes_area_mean_weight_at_latent_resolution(tmp_path):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255  # right half opaque
    alpha[:, 4:8] = 255  # half of every cell in the first latent column
    rgba = np.dstack([np.full((64, 64, 3), 128, dtype=np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    sample = dataset(tmp_path, alpha_weight=True).sample(0, epoch=0)
    weight = sample.weight
    assert weight.shape == (1, 8, 8) and weight.dtype == torch.float32
    assert torch.allclose(weight[0, :, 0], torch.full((8,), 0.5))
    assert torch.all(weight[0, :, 1:4] == 0.0)
    assert torch.all(weight[0, :, 4:] == 1.0)


def test_alpha_is_ignored_unless_enabled(tmp_path):
    make_image(tmp_path / "x.png", mode="RGBA")
    assert dataset(tmp_path).sample(0, epoch=0).weight is None


def test_images_without_alpha_get_no_weight_and_ones_in_mixed_batches(tmp_path):
    make_image(tmp_path / "a_rgb.png")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "b_rgba.png")
    ds = dataset(tmp_path, alpha_weight=True)
    assert ds.sample(0, epoch=0).weight is None
    batch = ds.batch(next(ds.sampler(batch_size=2)))
    weights = {s.record.relpath: w for s, w in zip(batch.samples, batch.weights)}
    assert batch.weights.shape == (2, 1, 8, 8)
    assert torch.all(weights["a_rgb.png"] == 1.0) and torch.all(weights["b_rgba.png"] == 0.0)


def test_weights_are_given_when_images_are_not_loaded(tmp_path):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:32] = 255  # top half opaque
    Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA").save(tmp_path / "x.png")
    ds = dataset(tmp_path, alpha_weight=True)
    batch = ds.batch(next(ds.sampler(batch_size=1)), load_images=False)
    assert batch.images is None
    assert torch.equal(batch.weights, ds.sample(0, epoch=0).weight[None])
    assert batch.weights[0, 0, :4].min() == 1.0 and batch.weights[0, 0, 4:].max() == 0.0


def test_batch_without_any_alpha_has_no_weights(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    ds = dataset(tmp_path, alpha_weight=True)
    assert ds.batch(next(ds.sampler(batch_size=2))).weights is None


# --- batches and summary ----------------------------------------------------------------------------


def test_batch_stacks_images_prompts_and_sizes(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", width=80)
    ds = dataset(tmp_path, template=write_template(tmp_path, "[name]"))
    batch = ds.batch(next(ds.sampler(batch_size=2)))
    assert batch.images.shape == (2, 3, 64, 64)
    assert batch.prompts == ["tok", "tok"]
    assert sorted(batch.original_sizes) == [(64, 64), (64, 80)]
    assert batch.target_size == (64, 64)
    assert ds.batch(batch.plan, load_images=False).images is None


def test_summary_counts_formats_sizes_captions_and_samples(tmp_path):
    make_image(tmp_path / "a.png", 64, 64)
    make_image(tmp_path / "b.png", 64, 64)
    make_image(tmp_path / "c.jpg", 96, 64)
    make_image(tmp_path / "123.webp", 128, 128)  # file name caption is empty
    (tmp_path / "a.txt").write_text("from a file", encoding="utf-8")
    (tmp_path / "c.txt").write_text("   \n", encoding="utf-8")  # empty caption file
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    summary = dataset(tmp_path, repeats=3).summary(batch_size=2)
    assert summary.image_count == 4
    assert summary.formats == {"png": 2, "jpeg": 1, "webp": 1}
    assert (summary.smallest, summary.largest) == ((64, 64), (128, 128))
    assert (summary.most_common, summary.most_common_count) == ((64, 64), 2)
    assert (summary.captions_from_file, summary.captions_from_filename, summary.captions_empty) == (1, 1, 2)
    assert summary.samples_per_epoch == 12
    assert summary.batches_per_epoch == 6
    assert summary.other_files == 1
    text = str(summary)
    for expected in ["images: 4", "png 2", "jpeg 1", "webp 1", "128x128", "samples per epoch: 12", "1 other"]:
        assert expected in text


def test_summary_shows_bucket_histogram(tmp_path):
    make_image(tmp_path / "w1.png", 512, 256)
    make_image(tmp_path / "w2.png", 520, 260)
    make_image(tmp_path / "s.png", 256, 256)
    summary = dataset(tmp_path, size=256, buckets=True, min_bucket=128, max_bucket=512).summary()
    assert summary.resolutions == {(192, 320): 2, (256, 256): 1}
    assert "buckets" in str(summary) and "320x192: 2" in str(summary)


# --- errors -----------------------------------------------------------------------------------------


def test_dataset_errors_are_user_errors():
    assert issubclass(DatasetError, UserError) and issubclass(TemplateError, DatasetError)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as error:
        dataset(tmp_path / "nowhere")
    assert "nowhere" in str(error.value)


def test_file_instead_of_folder_is_named(tmp_path):
    path = make_image(tmp_path / "single.png")
    with pytest.raises(DatasetError, match="not a folder") as error:
        dataset(path)
    assert "single.png" in str(error.value)


def test_folder_without_images_lists_accepted_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match="no images") as error:
        dataset(tmp_path)
    for extension in [".png", ".jpg", ".jpeg", ".webp"]:
        assert extension in str(error.value)


def test_every_corrupt_image_is_named_in_one_error(tmp_path):
    make_image(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "text.jpg").write_text("not an image", encoding="utf-8")
    with pytest.raises(DatasetError) as error:
        dataset(tmp_path)
    message = str(error.value)
    assert "truncated.png" in message and "sub/text.jpg" in message
    assert "good.png" not in message


def test_unreadable_caption_file_is_named(tmp_path):
    make_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\xfa bad utf-8")
    with pytest.raises(DatasetError, match=r"x\.txt"):
        dataset(tmp_path)


def test_too_small_images_are_named_with_the_fix(tmp_path):
    make_image(tmp_path / "tiny.png", 20, 30)  # needs 3.2x
    make_image(tmp_path / "also tiny.png", 30, 20)
    make_image(tmp_path / "fine.png", 40, 40)  # needs 1.6x: allowed, listed in the summary
    with pytest.raises(DatasetError) as error:
        dataset(tmp_path, size=64)
    message = str(error.value)
    assert "tiny.png (20x30)" in message and "also tiny.png (30x20)" in message
    assert "fine.png" not in message
    assert "smaller training size" in message and "no_upscale" in message


def test_too_small_images_are_accepted_with_no_upscale(tmp_path):
    make_image(tmp_path / "tiny.png", 70, 100)
    (record,) = dataset(tmp_path, size=256, no_upscale=True).samples
    assert record.target_size == (64, 64)


def test_image_smaller_than_64_px_with_no_upscale_is_named(tmp_path):
    make_image(tmp_path / "crumb.png", 40, 100)
    with pytest.raises(DatasetError, match=r"crumb\.png.*\n.*at least 64 px"):
        dataset(tmp_path, size=256, buckets=True, no_upscale=True, min_bucket=128, max_bucket=512)


def test_empty_template_file_is_named(tmp_path):
    make_image(tmp_path / "x.png")
    template = tmp_path / "empty_template.txt"
    template.write_text("\n   \n", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"empty_template\.txt.*empty"):
        dataset(tmp_path, template=str(template))


def test_unknown_template_lists_builtin_names(tmp_path):
    make_image(tmp_path / "x.png")
    with pytest.raises(TemplateError, match="subject_filewords") as error:
        dataset(tmp_path, template="no_such_template")
    assert "no_such_template" in str(error.value)


@pytest.mark.parametrize(
    "options",
    [
        {"size": 60},
        {"size": 320, "buckets": True, "min_bucket": 384},
        {"repeats": 0},
        {"tag_dropout": 1.5},
        {"caption_dropout": -0.1},
        {"keep_tags": -1},
        {"caption_extension": "txt"},
    ],
)
def test_invalid_settings_raise_config_error(tmp_path, options):
    make_image(tmp_path / "x.png")
    with pytest.raises(ConfigError):
        dataset(tmp_path, **options)
