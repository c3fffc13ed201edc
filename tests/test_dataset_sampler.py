"""The batch order of the training dataset: seeded permutations, bucket batches and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_training.dataset import BatchSampler, DatasetConfig, DatasetError, TrainingDataset
from lib_training.errors import ConfigError


def make_image(path: Path, width: int, height: int, color=(120, 40, 200)) -> None:
    Image.new("RGB", (width, height), color).save(path)


def flat_items(sampler: BatchSampler, batches: int) -> list[tuple[int, tuple[int, ...]]]:
    return [(plan.epoch, plan.items) for plan in (next(sampler) for _ in range(batches))]


def test_each_epoch_is_a_permutation_of_all_items():
    sampler = BatchSampler([list(range(10))], batch_size=3, seed=0)
    for _epoch in range(3):
        items = [item for _ in range(len(sampler)) for item in next(sampler).items]
        assert sorted(items) == list(range(10))
    assert sampler.epoch == 3


def test_order_depends_on_seed_and_epoch():
    def epoch(seed: int, number: int) -> list[tuple[int, ...]]:
        return BatchSampler([list(range(20))], batch_size=4, seed=seed).epoch_plan(number)

    assert epoch(1, 0) == epoch(1, 0)
    assert epoch(1, 0) != epoch(1, 1)
    assert epoch(1, 0) != epoch(2, 0)


def test_batches_hold_only_one_group():
    groups = [list(range(0, 7)), list(range(7, 12)), list(range(12, 13))]
    sampler = BatchSampler(groups, batch_size=2, seed=5)
    plan = sampler.epoch_plan(0)
    assert len(plan) == len(sampler) == 4 + 3 + 1
    for batch in plan:
        assert len({next(i for i, group in enumerate(groups) if item in group) for item in batch}) == 1


def test_drop_last_skips_incomplete_batches():
    sampler = BatchSampler([list(range(7)), list(range(7, 10))], batch_size=2, seed=0, drop_last=True)
    assert len(sampler) == 3 + 1
    assert all(len(batch) == 2 for batch in sampler.epoch_plan(0))


def test_no_full_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="batch size"):
        BatchSampler([list(range(3))], batch_size=4, seed=0, drop_last=True)


def test_bucketed_dataset_batches_share_a_resolution(tmp_path):
    for i in range(5):
        make_image(tmp_path / f"wide{i}.png", 512, 256)
        make_image(tmp_path / f"square{i}.png", 256, 256)
    config = DatasetConfig(tmp_path, size=256, buckets=True, min_bucket=128, max_bucket=512, repeats=2)
    ds = TrainingDataset(config, "tok")
    sampler = ds.sampler(batch_size=3)
    for _ in range(len(sampler)):
        plan = next(sampler)
        assert len({ds.record(item).target_size for item in plan.items}) == 1
    batch = ds.batch(next(sampler))
    assert batch.images.shape[2:] == batch.target_size


def test_resumed_sampler_continues_with_identical_batches():
    groups = [list(range(0, 9)), list(range(9, 14))]
    uninterrupted = BatchSampler(groups, batch_size=2, seed=7)
    expected = flat_items(uninterrupted, 20)  # crosses two epoch boundaries (7 batches each)

    first = BatchSampler(groups, batch_size=2, seed=7)
    head = flat_items(first, 9)
    state = first.state_dict()
    resumed = BatchSampler(groups, batch_size=2, seed=7)
    resumed.load_state_dict(state)
    assert head + flat_items(resumed, 11) == expected


def _dataset(folder: Path) -> TrainingDataset:
    (folder / "t.txt").write_text("[name], [filewords]\na photo of [name] with [filewords]\n", encoding="utf-8")
    config = DatasetConfig(
        folder / "images",
        size=64,
        repeats=3,
        flip=True,
        shuffle_tags=True,
        keep_tags=1,
        tag_dropout=0.2,
        caption_dropout=0.1,
        template=str(folder / "t.txt"),
        seed=11,
    )
    return TrainingDataset(config, "tok")


def test_resumed_dataset_gives_bit_identical_batches(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 10)]):
        img = Image.new("RGB", (80, 64), color)
        img.paste((255, 255, 255), (0, 0, 10, 64))  # asymmetric, so flips show
        img.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"subject{i}, red, green, blue, cyan", encoding="utf-8")

    def run(dataset: TrainingDataset, sampler: BatchSampler, steps: int) -> list:
        out = []
        for _ in range(steps):
            batch = dataset.batch(next(sampler))
            out.append((batch.plan, batch.prompts, batch.crops, batch.images))
        return out

    ds = _dataset(tmp_path)
    expected = run(ds, ds.sampler(batch_size=5), 8)  # 12 items, 3 batches per epoch

    first = _dataset(tmp_path)
    sampler = first.sampler(batch_size=5)
    head = run(first, sampler, 4)
    state = sampler.state_dict()
    second = _dataset(tmp_path)
    resumed = second.sampler(batch_size=5)
    resumed.load_state_dict(state)
    got = head + run(second, resumed, 4)

    for (plan_a, prompts_a, crops_a, images_a), (plan_b, prompts_b, crops_b, images_b) in zip(expected, got):
        assert plan_a == plan_b and prompts_a == prompts_b and crops_a == crops_b
        assert torch.equal(images_a, images_b)
    assert len({tuple(prompts) for _, prompts, _, _ in expected}) > 1  # the choices do vary


def test_resume_with_other_batch_size_is_refused():
    state = BatchSampler([list(range(10))], batch_size=2, seed=0).state_dict()
    with pytest.raises(DatasetError, match="batch_size"):
        BatchSampler([list(range(10))], batch_size=3, seed=0).load_state_dict(state)


def test_resume_with_changed_dataset_is_refused_unless_not_strict():
    sampler = BatchSampler([list(range(10))], batch_size=2, seed=0)
    next(sampler)
    state = sampler.state_dict()
    changed = BatchSampler([list(range(12))], batch_size=2, seed=0)
    with pytest.raises(DatasetError, match="changed"):
        changed.load_state_dict(state)
    changed.load_state_dict(state, strict=False)
    assert (changed.epoch, changed.position) == (0, 1)
