"""Sample data sets of one concept of the tiny world, for teaching it to the pretrained model.

A concept is a (colour, shape) pair; a data set is a folder of its pictures with captions that
say only what is not the concept (the background), so a method has to learn the concept itself.
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import islice
from pathlib import Path

from lib_training.world.scenes import HELD_OUT_PAIRS, SIDE, Scene, render, scene_at, scenes

TARGET = HELD_OUT_PAIRS[0]  # the held-out (colour, shape) pair taught by the demo and bench/quality.py


def concept_scenes(colour: str, shape: str, count: int, seed: int = 0) -> list[Scene]:
    """`count` scenes of the concept with the world's random places, sizes, tints and backgrounds."""
    out = []
    for index in range(count):
        s = scene_at(seed, index)  # the layout; its colour and shape are replaced
        out.append(Scene(shape, colour, s.background, s.centre, s.radius, _tint(colour, s), s.ground))
    return out


def _tint(colour: str, layout: Scene) -> tuple[int, int, int]:
    """The concept's colour with the layout scene's jitter."""
    from lib_training.world.scenes import COLOURS

    base, drawn = COLOURS[layout.colour], layout.rgb
    return tuple(max(0, min(255, c + d - b)) for c, b, d in zip(COLOURS[colour], base, drawn))  # type: ignore[return-value]


def write_concept(folder: Path, colour: str, shape: str, count: int = 12, seed: int = 0, side: int = SIDE) -> Path:
    """PNG pictures of the concept in `folder`, each with a caption naming only its background."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(concept_scenes(colour, shape, count, seed)):
        _write_picture(folder / f"{index:02d}-{colour}-{shape}", scene, f"on a {scene.background} background", side)
    return folder


def write_class_images(
    folder: Path, count: int, leave_out: Collection[tuple[str, str]] = (), seed: int = 1, side: int = SIDE
) -> Path:
    """`count` pictures of pretraining pairs, each captioned in full ("a red circle on a dark
    background"): regularization (class) images that remind a method of what the model already draws.
    Pairs in `leave_out` ((colour, shape)) are not shown, so prompts of them can test what is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = (s for s in scenes(seed, 0, 100 * count, split="pretrain") if (s.colour, s.shape) not in leave_out)
    for index, scene in enumerate(islice(wanted, count)):
        _write_picture(folder / f"{index:03d}-{scene.colour}-{scene.shape}", scene, scene.caption, side)
    return folder


def _write_picture(stem: Path, scene: Scene, caption: str, side: int) -> None:
    """STEM.png of the scene and STEM.txt holding its caption."""
    render(scene, side).save(stem.with_name(f"{stem.name}.png"))
    stem.with_name(f"{stem.name}.txt").write_text(caption + "\n", encoding="utf-8")
