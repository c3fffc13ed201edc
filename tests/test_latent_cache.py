"""The latent cache: keyed by content, size, crop, flip and VAE; memory and atomic disk storage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib_training.dataset import DatasetConfig, ImageView, LatentCache, LatentSampler, TrainingDataset
from lib_training.dataset import latent_cache as latent_cache_module
from lib_training.dataset.images import load_view


class FakeVAE:
    """Stands in for a VAE: mean = pooled pixels (+ a channel of ones), logvar = a constant; counts calls."""

    def __init__(self, logvar: float = -2.0):
        self.calls: list[tuple[int, ...]] = []
        self.logvar = logvar

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(tuple(images.shape))
        pooled = F.avg_pool2d(images, 8)  # [B, 3, H/8, W/8]
        mean = torch.cat([pooled, torch.ones_like(pooled[:, :1])], dim=1)  # [B, 4, H/8, W/8]
        return mean, torch.full_like(mean, self.logvar)

    @property
    def images_encoded(self) -> int:
        return sum(shape[0] for shape in self.calls)


def load_image(view: ImageView) -> torch.Tensor:
    return load_view(view)[0]


def make_image(path: Path, color=(255, 0, 0), width: int = 64, height: int = 64) -> Path:
    img = Image.new("RGB", (width, height), color)
    img.paste((0, 0, 255), (0, 0, width // 4, height))  # blue stripe on the left
    img.save(path)
    return path


def square_view(path: Path, side: int = 64, flip: bool = False) -> ImageView:
    return ImageView(path, (side, side), (0, 0), (side, side), flip)


def expected_mean(view: ImageView) -> torch.Tensor:
    return FakeVAE()(load_image(view)[None])[0][0]


def test_fill_encodes_each_view_once_and_get_serves_it(tmp_path):
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a")
    views = [square_view(make_image(tmp_path / f"{i}.png", (40 * i, 0, 0))) for i in range(3)]
    cache.fill(views, load_image, batch_size=2)
    cache.fill(views, load_image, batch_size=2)
    assert vae.images_encoded == 3
    mean, logvar = cache.get(views[1])
    assert mean.shape == logvar.shape == (4, 8, 8) and mean.dtype == torch.float32
    assert torch.equal(mean, expected_mean(views[1]))


def test_fill_batches_by_resolution_and_reports_progress(tmp_path):
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a")
    views = [square_view(make_image(tmp_path / f"s{i}.png", (50 * i, 0, 0)), 64) for i in range(3)]
    views += [square_view(make_image(tmp_path / f"b{i}.png", (0, 50 * i, 0), 128, 128), 128) for i in range(2)]
    progress = []
    cache.fill(views, load_image, batch_size=2, progress=lambda done, total: progress.append((done, total)))
    assert sorted(vae.calls) == [(1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 128, 128)]
    assert progress[0] == (0, 5) and progress[-1] == (5, 5)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_changed_image_content_is_encoded_again(tmp_path):
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a")
    view = square_view(make_image(tmp_path / "x.png", (255, 0, 0)))
    cache.fill([view], load_image)
    before = cache.get(view)[0]
    make_image(view.path, (0, 255, 0))
    stat = view.path.stat()
    os.utime(view.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(KeyError):
        cache.get(view)
    cache.fill([view], load_image)
    after = cache.get(view)[0]
    assert vae.images_encoded == 2
    assert not torch.equal(before, after)
    assert torch.equal(after, expected_mean(view))


def test_changed_image_content_is_not_served_from_disk(tmp_path):
    view = square_view(make_image(tmp_path / "x.png", (255, 0, 0)))
    LatentCache(FakeVAE(), "vae-a", tmp_path / "cache").fill([view], load_image)
    make_image(view.path, (0, 255, 0))
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a", tmp_path / "cache")
    cache.fill([view], load_image)
    assert vae.images_encoded == 1
    assert torch.equal(cache.get(view)[0], expected_mean(view))


def test_changed_size_is_a_different_entry(tmp_path):
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a")
    path = make_image(tmp_path / "x.png", width=128, height=128)
    small, large = square_view(path, 64), square_view(path, 128)
    cache.fill([small], load_image)
    cache.fill([large], load_image)
    assert vae.images_encoded == 2
    assert cache.get(small)[0].shape == (4, 8, 8) and cache.get(large)[0].shape == (4, 16, 16)


def test_changed_resize_scale_is_a_different_entry(tmp_path):
    cache = LatentCache(FakeVAE(), "vae-a")
    path = make_image(tmp_path / "x.png", width=128, height=128)
    whole = ImageView(path, (64, 64), (0, 0), (64, 64))
    corner = ImageView(path, (96, 96), (0, 0), (64, 64))  # same crop box, other scale
    cache.fill([whole, corner], load_image)
    assert len(cache) == 2
    assert torch.equal(cache.get(corner)[0], expected_mean(corner))


def test_changed_crop_is_a_different_entry(tmp_path):
    cache = LatentCache(FakeVAE(), "vae-a")
    path = make_image(tmp_path / "x.png", width=96, height=64)
    left = ImageView(path, (64, 96), (0, 0), (64, 64))
    right = ImageView(path, (64, 96), (0, 32), (64, 64))
    cache.fill([left, right], load_image)
    assert len(cache) == 2
    assert torch.equal(cache.get(right)[0], expected_mean(right))


def test_flip_is_a_different_entry(tmp_path):
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a")
    plain = square_view(make_image(tmp_path / "x.png"))
    mirrored = plain.mirrored(True)
    cache.fill([plain, mirrored], load_image)
    assert vae.images_encoded == 2
    assert torch.equal(cache.get(mirrored)[0], cache.get(plain)[0].flip(-1))


def test_changed_vae_is_encoded_again(tmp_path):
    view = square_view(make_image(tmp_path / "x.png"))
    LatentCache(FakeVAE(), "vae-a", tmp_path / "cache").fill([view], load_image)
    other_vae = FakeVAE(logvar=-5.0)
    cache = LatentCache(other_vae, "vae-b", tmp_path / "cache")
    cache.fill([view], load_image)
    assert other_vae.images_encoded == 1
    assert torch.all(cache.get(view)[1] == -5.0)


def test_disk_round_trip_serves_identical_latents_without_encoding(tmp_path):
    views = [square_view(make_image(tmp_path / f"{i}.png", (30 * i, 100, 0))) for i in range(3)]
    first = LatentCache(FakeVAE(), "vae-a", tmp_path / "cache")
    first.fill(views, load_image)

    def no_encode(images):
        raise AssertionError("should have been read from disk")

    second = LatentCache(no_encode, "vae-a", tmp_path / "cache")
    second.fill(views, load_image)
    for view in views:
        assert all(torch.equal(a, b) for a, b in zip(first.get(view), second.get(view)))


def test_disk_writes_leave_only_finished_files(tmp_path):
    views = [square_view(make_image(tmp_path / f"{i}.png", (50 * i, 0, 0))) for i in range(3)]
    cache_dir = tmp_path / "cache"
    cache = LatentCache(FakeVAE(), "vae-a", cache_dir)
    cache.fill(views, load_image)
    files = sorted(path.name for path in cache_dir.iterdir())
    assert files == sorted(f"{cache.key(view)}.safetensors" for view in views)


def test_failed_disk_write_leaves_no_file(tmp_path, monkeypatch):
    view = square_view(make_image(tmp_path / "x.png"))
    cache_dir = tmp_path / "cache"

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(latent_cache_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        LatentCache(FakeVAE(), "vae-a", cache_dir).fill([view], load_image)
    assert list(cache_dir.iterdir()) == []


def test_damaged_disk_file_is_encoded_again(tmp_path):
    view = square_view(make_image(tmp_path / "x.png"))
    cache = LatentCache(FakeVAE(), "vae-a", tmp_path / "cache")
    cache.fill([view], load_image)
    (tmp_path / "cache" / f"{cache.key(view)}.safetensors").write_bytes(b"garbage")
    vae = FakeVAE()
    fresh = LatentCache(vae, "vae-a", tmp_path / "cache")
    fresh.fill([view], load_image)
    assert vae.images_encoded == 1
    assert torch.equal(fresh.get(view)[0], expected_mean(view))


def test_content_is_hashed_once_per_file(tmp_path, monkeypatch):
    calls = []
    real = latent_cache_module.file_sha256
    monkeypatch.setattr(latent_cache_module, "file_sha256", lambda path: calls.append(path) or real(path))
    path = make_image(tmp_path / "x.png", width=128, height=128)
    cache = LatentCache(FakeVAE(), "vae-a")
    views = [square_view(path, 64), square_view(path, 128), square_view(path, 64, flip=True)]
    cache.fill(views, load_image)
    for view in views:
        cache.get(view)
    assert calls == [path]


def test_get_encodes_on_demand_when_given_a_loader(tmp_path):
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a")
    view = square_view(make_image(tmp_path / "x.png"))
    with pytest.raises(KeyError):
        cache.get(view)
    assert torch.equal(cache.get(view, load_image)[0], expected_mean(view))
    assert vae.images_encoded == 1


def test_dataset_views_fill_the_cache_for_every_batch(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"{i}.png", (80 * i, 0, 0), width=96)
    ds = TrainingDataset(DatasetConfig(tmp_path, size=64, flip=True), "tok")
    vae = FakeVAE()
    cache = LatentCache(vae, "vae-a")
    cache.fill(ds.views(), ds.load_image)
    assert vae.images_encoded == 6  # 3 images, each plain and mirrored
    sampler = ds.sampler(batch_size=2)
    for _ in range(6):
        batch = ds.batch(next(sampler), load_images=False)
        latents = LatentSampler("mean")(cache, batch.views, step=0)
        assert latents.shape == (len(batch.samples), 4, 8, 8)
    assert vae.images_encoded == 6


# --- sampling modes ---------------------------------------------------------------------------------


@pytest.fixture
def filled(tmp_path) -> tuple[LatentCache, list[ImageView]]:
    views = [square_view(make_image(tmp_path / f"{i}.png", (60 * i, 0, 0))) for i in range(2)]
    cache = LatentCache(FakeVAE(), "vae-a")
    cache.fill(views, load_image)
    return cache, views


def test_mean_mode_returns_the_mean(filled):
    cache, views = filled
    latents = LatentSampler("mean")(cache, views, step=3)
    assert torch.equal(latents, torch.stack([cache.get(view)[0] for view in views]))


def test_once_mode_keeps_one_seeded_sample_per_view(filled):
    cache, views = filled
    sampler = LatentSampler("once", seed=1)
    first = sampler(cache, views, step=0)
    assert torch.equal(first, sampler(cache, views, step=5))
    assert not torch.equal(first, LatentSampler("mean")(cache, views, step=0))
    assert torch.equal(first, LatentSampler("once", seed=1)(cache, views, step=9))  # reproducible
    assert not torch.equal(first, LatentSampler("once", seed=2)(cache, views, step=0))


def test_random_mode_draws_fresh_reproducible_samples_each_step(filled):
    cache, views = filled
    sampler = LatentSampler("random", seed=1)
    step1, step2 = sampler(cache, views, step=1), sampler(cache, views, step=2)
    assert not torch.equal(step1, step2)
    assert torch.equal(step1, LatentSampler("random", seed=1)(cache, views, step=1))
    mean = LatentSampler("mean")(cache, views, step=1)
    assert abs((step1 - mean).std().item() - float(torch.exp(torch.tensor(-1.0)))) < 0.1  # std = exp(logvar/2)
