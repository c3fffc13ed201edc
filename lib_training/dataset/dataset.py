"""The training dataset: a folder of captioned images turned into prompts and image tensors.

Usage by a trainer:

    dataset = TrainingDataset(DatasetConfig("/data/cat", size=512), name="my-cat")
    print(dataset.summary(batch_size=4))
    sampler = dataset.sampler(batch_size=4)
    sampler.load_state_dict(saved)  # when resuming
    for plan in sampler:
        batch = dataset.batch(plan)  # images [B, 3, H, W], prompts, weights, sizes, views
        ...
        saved = sampler.state_dict()

Items: with `repeats` = N each image appears N times per epoch; item `i` is image `i % images`.
Every random choice for an item (template line, caption dropout, tag dropout and shuffle, flip)
comes from a generator seeded by (seed, epoch, item), so it is the same in a resumed run.

Small images: an image that has to be enlarged to reach its training resolution is listed in the
summary when enlarged up to 2x, and refused when it would need more than 2x (its shorter side is
less than half the target's), as such an image would only teach blur. `no_upscale` keeps every
image at or below its own size instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from lib_training.dataset.buckets import BUCKET_STEP, Placement, bucket_resolutions, choose_target, place
from lib_training.dataset.captions import CaptionSource, augment_caption, caption_path, find_caption
from lib_training.dataset.errors import DatasetError
from lib_training.dataset.images import (
    ImageInfo,
    ImageView,
    inspect_images,
    load_view,
    load_weight,
    mask_path,
    relative_name,
    scan_folder,
)
from lib_training.dataset.sampler import BatchPlan, BatchSampler
from lib_training.dataset.summary import DatasetSummary, summarize
from lib_training.dataset.templates import fill_template, load_template
from lib_training.errors import ConfigError
from lib_training.options import option
from lib_training.seeding import derive_seed, rng_for

MAX_UPSCALE = 2.0  # images that would need more enlargement than this are refused


@dataclass
class DatasetConfig:
    """Where the training images are and how they become training samples."""

    path: str = option(help="Folder of training images (png, jpg, webp); subfolders included.", flag="--data")
    size: int = option(
        512,
        "Training resolution in pixels, a multiple of 8 (of 64 with buckets or no upscaling): the square's "
        "side, or the side of the bucket area.",
        min=64,
        max=4096,
    )
    buckets: bool = option(False, "Group images into aspect-ratio buckets instead of cropping them square.")
    no_upscale: bool = option(False, "Never enlarge an image; smaller images train at their own size.", advanced=True)
    min_bucket: int = option(256, "Shortest side a bucket may have, in pixels (multiple of 64).", advanced=True)
    max_bucket: int = option(2048, "Longest side a bucket may have, in pixels (multiple of 64).", advanced=True)
    repeats: int = option(1, "How many times each image appears per epoch.", min=1, max=10_000)
    flip: bool = option(False, "Mirror images left-right at random (half of the samples).")
    caption_extension: str = option(".txt", "Extension of the caption file beside each image.", advanced=True)
    template: str = option(
        "subject_filewords",
        "Prompt template: subject, subject_filewords, style, style_filewords, filewords, none, or the path of a .txt "
        "file with one prompt a line ([name] and [filewords] are filled in).",
    )
    shuffle_tags: bool = option(False, "Shuffle the comma-separated tags of each caption.", advanced=True)
    keep_tags: int = option(0, "Number of leading tags that are never shuffled or dropped.", min=0, advanced=True)
    tag_dropout: float = option(
        0.0, "Probability of leaving out each tag (except the kept ones).", min=0.0, max=1.0, advanced=True
    )
    caption_dropout: float = option(
        0.0, "Probability of leaving out the whole caption; [name] stays.", min=0.0, max=1.0, advanced=True
    )
    alpha_weight: bool = option(
        False,
        "Masked loss: use each image's NAME.mask.png (white trains, black does not), or its alpha channel, "
        "as a per-pixel loss weight.",
        advanced=True,
    )
    class_path: str = option(
        "",
        "Regularization (class) images: a folder of pictures of the subject's class, trained on their own "
        "captions (caption files, else file names); each step also trains on one of their batches.",
        advanced=True,
        role="folder",
    )
    prior_loss_weight: float = option(1.0, "Weight of the regularization images' loss.", min=0.0, advanced=True)
    validation_images: int = option(
        0,
        "Images held out of training (chosen by the seed) whose loss is measured as a validation loss.",
        min=0,
        advanced=True,
    )
    seed: int = option(0, "Seed of the batch order and of every random choice per sample.", internal=True)

    @property
    def prompts_vary(self) -> bool:
        """Whether samples draw new prompts without end (tags shuffled or dropped), so that not every
        prompt of a run can be listed (`TrainingDataset.all_prompts`)."""
        return self.shuffle_tags or self.tag_dropout > 0

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid setting (`problems` lists them all)."""
        problems = self.problems()
        if problems:
            raise ConfigError(next(iter(problems.values())))

    def problems(self) -> dict[str, str]:
        """Every setting that cannot work, by field name, each with what to do instead (empty when
        valid). Only the settings themselves: `folder_problem` and `template_problem` look at files."""
        problems: dict[str, str] = {}
        step = 64 if self.buckets or self.no_upscale else 8
        if self.size < 64 or self.size % step:
            why = " with buckets or no_upscale" if step == 64 else ""
            problems["size"] = (
                f"The training size must be a multiple of {step}{why} and at least 64 (got {self.size}); "
                f"try {max(64, round(self.size / step) * step)}."
            )
        if self.buckets:
            for name in ("min_bucket", "max_bucket"):
                value = getattr(self, name)
                if value < BUCKET_STEP or value % BUCKET_STEP:
                    problems[name] = f"{name} must be a positive multiple of {BUCKET_STEP} (got {value})."
            if "size" not in problems and not self.min_bucket <= self.size <= self.max_bucket:
                problems["size"] = (
                    f"The training size {self.size} must lie between min_bucket {self.min_bucket} "
                    f"and max_bucket {self.max_bucket}."
                )
        if self.repeats < 1:
            problems["repeats"] = f"repeats must be at least 1 (got {self.repeats})."
        if self.validation_images < 0:
            problems["validation_images"] = f"validation_images cannot be negative (got {self.validation_images})."
        if self.keep_tags < 0:
            problems["keep_tags"] = f"keep_tags cannot be negative (got {self.keep_tags})."
        for name in ("tag_dropout", "caption_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems[name] = f"{name} is a probability between 0 and 1 (got {value})."
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            problems["caption_extension"] = (
                f"The caption extension must start with a dot, like '.txt' (got {self.caption_extension!r})."
            )
        return problems

    def folder_problem(self) -> str | None:
        """Why the dataset folder cannot be trained on (missing, not a folder, unreadable, no images), or None.

        Quick: lists the folder without opening the images (training checks every image before it starts).
        """
        if not str(self.path).strip():
            return "Give the folder that holds the training images."
        try:
            scan_folder(Path(self.path), readable=True)
        except DatasetError as error:
            return str(error)
        return None

    def template_problem(self) -> str | None:
        """Why the prompt template cannot be used (unknown, unreadable, empty), or None."""
        try:
            load_template(self.template)
        except DatasetError as error:
            return str(error)
        return None


@dataclass(frozen=True)
class ImageRecord:
    """One image of the dataset, as scanned and validated."""

    info: ImageInfo
    relpath: str  # path relative to the dataset folder
    caption: str
    caption_source: CaptionSource
    placement: Placement

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the image file (after EXIF orientation)."""
        return self.info.size

    @property
    def target_size(self) -> tuple[int, int]:
        return self.placement.target

    def view(self, flip: bool = False) -> ImageView:
        p = self.placement
        return ImageView(self.info.path, p.resized, p.crop, p.target, flip)


@dataclass
class Sample:
    """One dataset item, materialised for one epoch."""

    item: int
    epoch: int
    record: ImageRecord
    view: ImageView  # the latent cache's key: file, resize, crop, flip
    prompt: str
    image: Tensor | None  # [3, H, W] in [-1, 1]; None when not loaded
    weight: Tensor | None  # [1, H/8, W/8] in [0, 1]; None without alpha weighting or alpha channel

    @property
    def original_size(self) -> tuple[int, int]:
        """(h, w) of the image file: SDXL's original size."""
        return self.record.size

    @property
    def crop(self) -> tuple[int, int]:
        """(top, left) of the crop at the resized scale, in the image as shown: SDXL's crop."""
        return self.view.output_crop


@dataclass
class Batch:
    """Samples of one batch, stacked; all share `target_size`."""

    plan: BatchPlan
    samples: list[Sample]
    prompts: list[str]
    images: Tensor | None  # [B, 3, H, W] in [-1, 1]; None when not loaded
    weights: Tensor | None  # [B, 1, H/8, W/8]; ones for images without alpha; None if no image has a weight
    original_sizes: list[tuple[int, int]]  # (h, w) per sample
    crops: list[tuple[int, int]]  # (top, left) per sample
    target_size: tuple[int, int]  # (h, w)

    @property
    def views(self) -> list[ImageView]:
        return [sample.view for sample in self.samples]


class TrainingDataset:
    """Scans and validates the folder on construction; raises `DatasetError` listing every bad file."""

    def __init__(self, config: DatasetConfig, name: str):
        config.validate()
        self.config = config
        self.name = name
        self.template = load_template(config.template)
        scan = scan_folder(Path(config.path))
        self.root = scan.root
        infos, problems = inspect_images(scan.images, scan.root)
        captions: dict[Path, tuple[str, CaptionSource]] = {}
        for info in infos:
            try:
                captions[info.path] = find_caption(info.path, config.caption_extension)
            except (OSError, UnicodeDecodeError) as error:
                text_path = caption_path(info.path, config.caption_extension)
                problems.append(f"{relative_name(text_path, scan.root)}: {type(error).__name__}: {error}")
        if problems:
            raise DatasetError(
                f"{len(problems)} file(s) in {scan.root} cannot be read; fix or remove them:\n  "
                + "\n  ".join(problems)
            )
        self.buckets = bucket_resolutions(config.size, config.min_bucket, config.max_bucket) if config.buckets else None
        self.samples: list[ImageRecord] = []
        too_small: list[str] = []
        for info in infos:
            relpath = relative_name(info.path, scan.root)
            height, width = info.size
            target = choose_target(height, width, config.size, self.buckets, config.no_upscale, config.max_bucket)
            if target is None:
                too_small.append(f"{relpath} ({width}x{height}): a side is shorter than {BUCKET_STEP} px")
                continue
            placement = place(info.size, target)
            if placement.scale > MAX_UPSCALE:
                too_small.append(
                    f"{relpath} ({width}x{height}) would be enlarged {placement.scale:.1f}x to {target[1]}x{target[0]}"
                )
                continue
            caption, source = captions[info.path]
            self.samples.append(ImageRecord(info, relpath, caption, source, placement))
        if too_small:
            fix = (
                f"With no_upscale every side must be at least {BUCKET_STEP} px: remove or replace them."
                if config.no_upscale
                else f"Images are enlarged at most {MAX_UPSCALE:g}x. Use a smaller training size, enable "
                "no_upscale to train them at their own size, or replace them with larger images."
            )
            raise DatasetError(
                f"{len(too_small)} image(s) are too small for training size {config.size} "
                "(sizes as width x height):\n  " + "\n  ".join(too_small) + "\n" + fix
            )
        known = {caption_path(path, config.caption_extension) for path in scan.images}
        known |= {mask_path(path) for path in scan.images}
        self.other_files = [path for path in scan.other_files if path not in known]
        self._weights: dict[ImageView, Tensor | None] = {}  # alpha weights kept for runs on cached latents
        self.validation: list[ImageRecord] = []  # held out of training, for a validation loss
        if config.validation_images:
            self._hold_out(config.validation_images)
        self.class_data: TrainingDataset | None = None  # regularization images, if any
        if config.class_path.strip():
            self.class_data = self._class_dataset(config)

    def _class_dataset(self, config: DatasetConfig) -> TrainingDataset:
        """The regularization images: trained on their own captions (caption files, else file names)."""
        own = replace(
            config,
            path=config.class_path,
            class_path="",
            template="filewords",
            validation_images=0,
            seed=derive_seed(config.seed, "class"),
        )
        try:
            return TrainingDataset(own, self.name)
        except DatasetError as error:
            raise DatasetError(
                f"regularization (class) images: {error} Give a folder of class images, or clear class_path."
            ) from error

    def _hold_out(self, count: int) -> None:
        if count >= len(self.samples):
            raise DatasetError(
                f"{count} validation image(s) would leave no training image of the {len(self.samples)} found; "
                "hold out fewer, or add images."
            )
        chosen = set(rng_for(self.config.seed, "validation").sample(range(len(self.samples)), count))
        self.validation = [r for i, r in enumerate(self.samples) if i in chosen]
        self.samples = [r for i, r in enumerate(self.samples) if i not in chosen]

    def validation_items(self) -> list[tuple[ImageView, str]]:
        """The held-out images as the validation loss sees them: unflipped, with the template's first line
        and the plain caption."""
        line = self.template.lines[0]
        return [(record.view(False), fill_template(line, self.name, record.caption)) for record in self.validation]

    def all_prompts(self) -> list[str]:
        """Every prompt training can draw, each once: each template line with each caption (and without
        it, with caption dropout), the regularization images' and the held-out images' prompts. Only
        for fixed prompts (see `DatasetConfig.prompts_vary`)."""
        if self.config.prompts_vary:
            raise ValueError("with tag shuffle or tag dropout the prompts cannot be listed")
        captions = [record.caption for record in self.samples]
        if self.config.caption_dropout > 0:
            captions.append("")
        prompts = [fill_template(line, self.name, caption) for caption in captions for line in self.template.lines]
        prompts += [prompt for _, prompt in self.validation_items()]
        if self.class_data is not None:
            prompts += self.class_data.all_prompts()
        return list(dict.fromkeys(prompts))

    def __len__(self) -> int:
        """Training items per epoch (images x repeats)."""
        return len(self.samples) * self.config.repeats

    def record(self, item: int) -> ImageRecord:
        return self.samples[item % len(self.samples)]

    # --- order ----------------------------------------------------------------------------------
    def sampler(self, batch_size: int, drop_last: bool = False) -> BatchSampler:
        """A seeded, resumable batch order; every batch holds items of one training resolution."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for item in range(len(self)):
            groups[self.record(item).target_size].append(item)
        ordered = [groups[size] for size in sorted(groups)]
        return BatchSampler(ordered, batch_size, self.config.seed, drop_last)

    # --- samples --------------------------------------------------------------------------------
    def sample(self, item: int, epoch: int, load_image: bool = True) -> Sample:
        """Item `item` as drawn in `epoch`: prompt, flip, weight and (when `load_image`) the image."""
        cfg = self.config
        record = self.record(item)
        line_rng = rng_for(cfg.seed, "template", epoch, item)
        line = self.template.lines[line_rng.randrange(len(self.template.lines))]
        filewords = augment_caption(
            record.caption,
            rng_for(cfg.seed, "caption", epoch, item),
            shuffle=cfg.shuffle_tags,
            keep=cfg.keep_tags,
            tag_dropout=cfg.tag_dropout,
            caption_dropout=cfg.caption_dropout,
        )
        flip = cfg.flip and rng_for(cfg.seed, "flip", epoch, item).random() < 0.5
        view = record.view(flip)
        image = weight = None
        if load_image:
            image, weight = load_view(view, with_alpha=cfg.alpha_weight)
        elif cfg.alpha_weight and record.info.has_alpha:
            weight = self._weights.get(view)
            if weight is None:
                weight = self._weights[view] = load_weight(view)
        return Sample(item, epoch, record, view, fill_template(line, self.name, filewords), image, weight)

    def batch(self, plan: BatchPlan, load_images: bool = True) -> Batch:
        """The samples of `plan` stacked; skip loading images when latents come from a cache.

        Alpha weights are given either way (without images they are computed once per view and kept).
        """
        samples = [self.sample(item, plan.epoch, load_images) for item in plan.items]
        images = torch.stack([s.image for s in samples]) if load_images else None  # type: ignore[misc]
        weights = None
        if any(s.weight is not None for s in samples):
            height, width = samples[0].view.target_size
            ones = torch.ones(1, height // 8, width // 8)
            weights = torch.stack([ones if s.weight is None else s.weight for s in samples])
        return Batch(
            plan,
            samples,
            [s.prompt for s in samples],
            images,
            weights,
            [s.original_size for s in samples],
            [s.crop for s in samples],
            samples[0].view.target_size,
        )

    # --- latent caching -------------------------------------------------------------------------
    def views(self) -> list[ImageView]:
        """Every distinct view training can ask for: each image, and its mirror image when flip is on."""
        flips = (False, True) if self.config.flip else (False,)
        held_out = [view for view, _ in self.validation_items()]
        regularization = self.class_data.views() if self.class_data is not None else []
        return [record.view(flip) for record in self.samples for flip in flips] + held_out + regularization

    def load_image(self, view: ImageView) -> Tensor:
        """The image of `view` as [3, H, W] in [-1, 1] (for filling a latent cache)."""
        return load_view(view)[0]

    # --- summary --------------------------------------------------------------------------------
    def summary(self, batch_size: int | None = None) -> DatasetSummary:
        """Counts and sizes to show before training; with `batch_size`, also batches per epoch."""
        batches = len(self.sampler(batch_size)) if batch_size else None
        return summarize(self.root, self.samples, self.config, self.template, len(self.other_files), batches)
