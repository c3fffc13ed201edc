"""Training resolutions: square resize, aspect-ratio buckets, and how an image is fitted to one.

Buckets are (height, width) pairs, both multiples of 64 between a minimum and a maximum side, whose
area is at most and about size * size. Each image goes to the bucket with the closest aspect ratio
(compared on a log scale, so 2:1 and 1:2 are equally far from 1:1). An image is fitted to its
target by scaling it until it covers the target, then cropping the middle.

`no_upscale` never enlarges an image: when the closest bucket (or the square) would need it, the
image gets a resolution from its own area instead, its sides rounded down to multiples of 64 (the
minimum bucket side does not apply then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUCKET_STEP = 64


def bucket_resolutions(size: int, min_side: int, max_side: int, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """All buckets (h, w) for area size*size, sorted by aspect ratio w/h (tall first).

    For every side length the other side is the largest multiple of `step` keeping the area within
    size*size; each shape is offered both wide and tall.
    """
    area = size * size
    buckets = set()
    for side in range(min_side, max_side + 1, step):
        other = area // side // step * step
        if min_side <= other <= max_side:
            buckets.update({(other, side), (side, other)})
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def closest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's; ties go to the larger bucket."""
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - log_ratio), -hw[0] * hw[1]))


def own_area_resolution(
    height: int, width: int, size: int, max_side: int, step: int = BUCKET_STEP
) -> tuple[int, int] | None:
    """The largest (h, w) in multiples of `step` that fits in the image (scaled down to area size*size
    when larger) without enlarging it; None when a side is shorter than `step`."""
    scale = min(1.0, size / math.sqrt(height * width))
    target_h = min(max_side, int(height * scale) // step * step)
    target_w = min(max_side, int(width * scale) // step * step)
    if target_h == 0 or target_w == 0:
        return None
    return target_h, target_w


def choose_target(
    height: int,
    width: int,
    size: int,
    buckets: list[tuple[int, int]] | None,
    no_upscale: bool,
    max_side: int,
) -> tuple[int, int] | None:
    """The training resolution (h, w) of an image; None when `no_upscale` leaves it no resolution.

    Without buckets it is the square (size, size); with `no_upscale` an image smaller than that gets
    a square of its own shorter side rounded down to a multiple of 64.
    """
    if buckets is None:
        if no_upscale and min(height, width) < size:
            side = min(height, width) // BUCKET_STEP * BUCKET_STEP
            return (side, side) if side > 0 else None
        return size, size
    target = closest_bucket(buckets, height, width)
    if no_upscale and (target[0] > height or target[1] > width):
        return own_area_resolution(height, width, size, max_side)
    return target


@dataclass(frozen=True)
class Placement:
    """How an image of `original` size is fitted to `target`: scale to `resized`, then crop at `crop`."""

    original: tuple[int, int]  # (h, w) of the image
    target: tuple[int, int]  # (h, w) of the training resolution
    resized: tuple[int, int]  # (h, w) after scaling; covers the target
    crop: tuple[int, int]  # (top, left) of the centred crop in the resized image
    scale: float  # resized / original; above 1 means the image is enlarged


def place(original: tuple[int, int], target: tuple[int, int]) -> Placement:
    """Scale `original` (h, w) to cover `target` (h, w) keeping its aspect ratio, and centre the crop."""
    height, width = original
    target_h, target_w = target
    scale = max(target_h / height, target_w / width)
    resized_h = max(target_h, round(height * scale))
    resized_w = max(target_w, round(width * scale))
    crop = ((resized_h - target_h) // 2, (resized_w - target_w) // 2)
    return Placement(original, target, (resized_h, resized_w), crop, scale)
