"""What the dataset holds, shown to the user before training starts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lib_training.dataset.dataset import DatasetConfig, ImageRecord
    from lib_training.dataset.templates import PromptTemplate


LISTED_UPSCALED = 20  # enlarged images named in `str()`; the rest are counted


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


@dataclass
class DatasetSummary:
    """Counts and sizes of a dataset; sizes are (h, w), shown as width x height by `str()`."""

    folder: Path
    image_count: int
    formats: dict[str, int]  # "png" -> images
    smallest: tuple[int, int]  # (h, w) of the image with the fewest pixels
    largest: tuple[int, int]
    most_common: tuple[int, int]
    most_common_count: int
    bucketed: bool
    resolutions: dict[tuple[int, int], int]  # training resolution (h, w) -> images: the bucket histogram
    captions_from_file: int  # non-empty captions read from caption files
    captions_from_filename: int  # non-empty captions taken from file names
    captions_empty: int
    alpha_images: int  # images with an alpha channel
    alpha_weighted: bool  # whether alpha is used as loss weight
    repeats: int
    samples_per_epoch: int  # images x repeats
    batches_per_epoch: int | None
    other_files: int  # non-image files that were ignored (caption files not counted)
    upscaled: list[tuple[str, float]]  # (relative path, enlargement) of images enlarged to train
    template: str
    template_uses_filewords: bool

    def __str__(self) -> str:
        formats = ", ".join(f"{name} {count}" for name, count in sorted(self.formats.items()))
        lines = [f"Dataset {self.folder}"]
        images = f"  images: {self.image_count} ({formats})"
        if self.other_files:
            images += f"; {_count(self.other_files, 'other file')} ignored"
        lines.append(images)
        lines.append(
            f"  sizes (width x height): smallest {_wxh(self.smallest)}, largest {_wxh(self.largest)}, "
            f"most common {_wxh(self.most_common)} ({_count(self.most_common_count, 'image')})"
        )
        caption_line = (
            f"  captions: {self.captions_from_file} from caption files, "
            f"{self.captions_from_filename} from file names, {self.captions_empty} empty"
        )
        if not self.template_uses_filewords:
            caption_line += f" (unused: template {self.template} has no [filewords])"
        lines.append(caption_line)
        if self.alpha_images:
            use = "used as loss weight" if self.alpha_weighted else "alpha ignored"
            lines.append(f"  with alpha channel: {self.alpha_images} ({use})")
        title = "buckets" if self.bucketed else "training resolutions"
        if self.bucketed or len(self.resolutions) > 1:
            histogram = ", ".join(f"{_wxh(size)}: {count}" for size, count in sorted(self.resolutions.items()))
            lines.append(f"  {title} (width x height: images): {histogram}")
        else:
            lines.append(f"  training resolution: {_wxh(next(iter(self.resolutions)))}")
        epoch = f"  samples per epoch: {self.samples_per_epoch}"
        epoch += f" ({_count(self.image_count, 'image')} x {_count(self.repeats, 'repeat')}"
        if self.batches_per_epoch is not None:
            epoch += f"; {self.batches_per_epoch} batches"
        lines.append(epoch + ")")
        if self.upscaled:
            lines.append(f"  enlarged to fit (may look soft): {len(self.upscaled)}")
            lines.extend(f"    {name} ({scale:.2f}x)" for name, scale in self.upscaled[:LISTED_UPSCALED])
            if len(self.upscaled) > LISTED_UPSCALED:
                lines.append(f"    and {len(self.upscaled) - LISTED_UPSCALED} more")
        return "\n".join(lines)


def summarize(
    folder: Path,
    records: Sequence[ImageRecord],
    config: DatasetConfig,
    template: PromptTemplate,
    other_files: int,
    batches_per_epoch: int | None,
) -> DatasetSummary:
    """Count what `records` hold."""
    sizes = Counter(record.size for record in records)
    by_area = sorted(sizes, key=lambda hw: (hw[0] * hw[1], hw))
    most_common, most_common_count = max(sizes.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1]))
    captions = Counter(record.caption_source if record.caption else "empty" for record in records)
    return DatasetSummary(
        folder=folder,
        image_count=len(records),
        formats=dict(Counter(record.info.format for record in records)),
        smallest=by_area[0],
        largest=by_area[-1],
        most_common=most_common,
        most_common_count=most_common_count,
        bucketed=config.buckets,
        resolutions=dict(Counter(record.target_size for record in records)),
        captions_from_file=captions["file"],
        captions_from_filename=captions["filename"],
        captions_empty=captions["empty"],
        alpha_images=sum(record.info.has_alpha for record in records),
        alpha_weighted=config.alpha_weight,
        repeats=config.repeats,
        samples_per_epoch=len(records) * config.repeats,
        batches_per_epoch=batches_per_epoch,
        other_files=other_files,
        upscaled=[(r.relpath, r.placement.scale) for r in records if r.placement.scale > 1.0 + 1e-9],
        template=template.name,
        template_uses_filewords=template.uses_filewords,
    )
