"""The tiny world: seeded, captioned 64x64 pictures of one coloured shape on a light or dark ground.

Every picture is a `Scene` (what is drawn, where) drawn by `render`; `scene_at(seed, index, split)`
gives the same scene for the same arguments on every machine (numpy's PCG64 seeded by
(seed, index)), so a data set is a seed and a range of indices, never a folder of files.

Some of the world is kept out of pretraining (`HELD_OUT_SHAPES`, `HELD_OUT_PAIRS`): a training
method can then be asked to teach something the pretrained model has never been shown.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

SIDE = 64  # pixels per side of a picture
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then averaged down (anti-aliasing)

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 55, 190),
    "orange": (245, 135, 20),
}
BACKGROUNDS = ("light", "dark")

HELD_OUT_SHAPES = ("heart",)  # never shown in pretraining
HELD_OUT_PAIRS = (("green", "triangle"), ("blue", "star"))  # colour and shape each seen, never together

Split = Literal["pretrain", "all", "held_out_pairs"]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str  # "light" or "dark"
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float  # half the shape's extent, pixels
    rgb: tuple[int, int, int]  # the shape's fill (the colour's, jittered)
    ground: tuple[int, int, int]  # the background's fill

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption(colour: str, shape: str, background: str | None = None) -> str:
    """'a red circle on a dark background' ('an orange ...'); without a background, 'a red circle'."""
    text = f"{article(colour)} {colour} {shape}"
    return f"{text} on a {background} background" if background else text


def is_held_out(colour: str, shape: str) -> bool:
    return shape in HELD_OUT_SHAPES or (colour, shape) in HELD_OUT_PAIRS


def pretraining_pairs() -> list[tuple[str, str]]:
    """(colour, shape) pairs shown in pretraining."""
    return [(c, s) for s in SHAPES for c in COLOURS if not is_held_out(c, s)]


def scene_at(seed: int, index: int, split: Split = "all") -> Scene:
    """The `index`-th scene of the world seeded `seed`; `split` limits what it may show."""
    rng = np.random.default_rng([seed, index])
    if split == "pretrain":
        pairs = pretraining_pairs()
    elif split == "held_out_pairs":
        pairs = list(HELD_OUT_PAIRS)
    else:
        pairs = [(c, s) for s in SHAPES for c in COLOURS]
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    background = BACKGROUNDS[int(rng.integers(2))]
    radius = float(rng.uniform(12.0, 24.0))
    cx, cy = (float(v) for v in rng.uniform(radius + 2, SIDE - radius - 2, size=2))
    jitter = rng.integers(-12, 13, size=3)
    rgb = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[colour], jitter))
    level = int(rng.integers(215, 246)) if background == "light" else int(rng.integers(10, 41))
    ground = tuple(int(np.clip(level + d, 0, 255)) for d in rng.integers(-6, 7, size=3))
    return Scene(shape, colour, background, (cx, cy), radius, rgb, ground)  # type: ignore[arg-type]


def scenes(seed: int, start: int, count: int, split: Split = "all") -> Iterator[Scene]:
    for index in range(start, start + count):
        yield scene_at(seed, index, split)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon points of the polygonal shapes, centred on (cx, cy), extent about 2r."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # pointing up
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":  # five points, one up
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            reach = r if k % 2 == 0 else r * 0.42
            points.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle)))
        return points
    if shape == "cross":  # a plus sign
        a, b = r * 0.9, r * 0.32
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
            (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]  # fmt: skip
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(scene: Scene, side: int = SIDE) -> Image.Image:
    """The scene as an RGB picture `side` pixels square (positions scale with `side`)."""
    big = side * SUPERSAMPLE
    k = big / SIDE
    image = Image.new("RGB", (big, big), scene.ground)
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.centre[0] * k, scene.centre[1] * k, scene.radius * k
    if scene.shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=scene.rgb)
    elif scene.shape == "heart":  # two lobes over a point
        lobe = r * 0.5
        draw.ellipse((cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe), fill=scene.rgb)
        draw.ellipse((cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe), fill=scene.rgb)
        draw.polygon(
            [(cx - r * 0.97, cy - r * 0.15), (cx + r * 0.97, cy - r * 0.15), (cx, cy + r * 0.9)], fill=scene.rgb
        )
    else:
        draw.polygon(_outline(scene.shape, cx, cy, r), fill=scene.rgb)
    return image.resize((side, side), Image.Resampling.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Pictures -> [B, 3, H, W] float32 in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # [B, H, W, 3]
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def batch(seed: int, start: int, count: int, split: Split = "all") -> tuple[torch.Tensor, list[Scene]]:
    """`count` scenes from `start` and their pictures [count, 3, 64, 64] in [-1, 1]."""
    drawn = list(scenes(seed, start, count, split))
    return to_tensor([render(s) for s in drawn]), drawn
