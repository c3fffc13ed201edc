"""Captions of training images and their per-sample augmentation (tag shuffle and dropout).

A caption comes from a text file beside the image with the same stem (`photo.png` -> `photo.txt`)
or, when there is none, from the file name: the stem with leading digits and dashes removed, so
`00012-a red car.png` gives "a red car". In a caption file, surrounding whitespace is stripped and
non-blank lines are joined with ", " (a tag list written one tag per line stays a tag list).

Tags are the comma-separated parts of a caption. Augmentation only touches captions when tag
shuffle or tag dropout is on; otherwise the caption is used exactly as written.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Literal

CaptionSource = Literal["file", "filename"]

_LEADING_NUMBERS = re.compile(r"^[\d-]+\s*")


def caption_from_filename(path: Path) -> str:
    """The file's stem without leading digits and dashes ("00012-a red car.png" -> "a red car")."""
    return _LEADING_NUMBERS.sub("", path.stem).strip()


def caption_path(image_path: Path, extension: str) -> Path:
    """Where the caption file of `image_path` would be ("photo.png", ".txt" -> "photo.txt")."""
    return image_path.with_name(image_path.stem + extension)


def read_caption_file(path: Path) -> str:
    """The caption in a text file (UTF-8, BOM allowed); raises OSError / UnicodeDecodeError."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return ", ".join(" ".join(line.split()) for line in lines if line.strip())


def find_caption(image_path: Path, extension: str) -> tuple[str, CaptionSource]:
    """(caption, where it came from) for one image; the caption file wins over the file name."""
    text_path = caption_path(image_path, extension)
    if text_path.is_file():
        return read_caption_file(text_path), "file"
    return caption_from_filename(image_path), "filename"


def split_tags(caption: str) -> list[str]:
    """The non-empty, stripped comma-separated parts of `caption`."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def augment_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep: int = 0,
    tag_dropout: float = 0.0,
    caption_dropout: float = 0.0,
) -> str:
    """One sample's variant of `caption`, drawing from `rng` in a fixed order.

    - caption dropout: with probability `caption_dropout` the whole caption becomes "".
    - tag dropout: each tag after the first `keep` is removed with probability `tag_dropout`.
    - shuffle: the tags after the first `keep` are put in random order; the first `keep` stay first.
    When shuffle or tag dropout is on the result is the tags joined with ", ".
    """
    if caption_dropout > 0.0 and rng.random() < caption_dropout:
        return ""
    if not shuffle and tag_dropout <= 0.0:
        return caption
    tags = split_tags(caption)
    fixed, rest = tags[:keep], tags[keep:]
    if tag_dropout > 0.0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)
