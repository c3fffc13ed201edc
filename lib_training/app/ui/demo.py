"""The `serve --demo` assets, made once: the tiny world's pretrained SD1 checkpoint, and pictures of
a concept it never saw (`lib_training.world`), so the previews of a demo run turn into it.

They live in the cache folder (`$SDWT_CACHE`, else `~/.cache/sd-webui-training`) under `demo-v2/`,
built in a temporary folder and renamed into place, so an interrupted first start never leaves a
half-made cache. The presets fill the textual-inversion form so that a run on a CPU takes a minute or two.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from lib_training.errors import UserError
from lib_training.user_cache import cache_root

DEMO_VERSION = "demo-v6"  # v6: the tiny world model at UNet step 48000 and its green-triangle dataset
IMAGE_SIDE = 96
TRAINING_SIDE = 64
NAME = "demo-shape"

# (shape, colour name, RGB): each becomes one image with the caption "a COLOUR SHAPE" ("an" before a vowel).
_SHAPES = [
    ("circle", "red", (210, 40, 40)),
    ("square", "blue", (40, 80, 210)),
    ("triangle", "green", (40, 160, 60)),
    ("circle", "orange", (240, 140, 20)),
    ("square", "purple", (140, 50, 180)),
    ("triangle", "teal", (20, 150, 150)),
]


@dataclass(frozen=True)
class DemoAssets:
    checkpoint: Path  # the tiny world's pretrained SD1 checkpoint (lib_training.world)
    dataset: Path  # pictures of a held-out colour-shape pair (a green triangle), captioned with their background


def demo_assets(root: Path | None = None) -> DemoAssets:
    """The demo checkpoint and dataset under `root` (default `cache_root()`), made on first use."""
    folder = (root or cache_root()) / DEMO_VERSION
    assets = DemoAssets(folder / "tiny-world-sd1.safetensors", folder / "shapes")
    if assets.checkpoint.is_file() and assets.dataset.is_dir():
        return assets
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=folder.parent))
    except OSError as error:
        raise UserError(
            f"cannot create the demo cache under {folder.parent}: {error.strerror or error}. "
            "Set SDWT_CACHE to a writable folder."
        ) from error
    try:
        import torch

        from lib_training.world.concepts import TARGET, write_concept
        from lib_training.world.model import shipped_model

        shipped_model().save(staging / assets.checkpoint.name, dtype=torch.float16)
        write_concept(staging / assets.dataset.name, *TARGET)
        if folder.exists():  # left incomplete by hand: replace it
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:
            if not (assets.checkpoint.is_file() and assets.dataset.is_dir()):
                raise
            # another process finished first: use its files
    except OSError as error:
        raise UserError(
            f"cannot write the demo files to {folder}: {error.strerror or error}. Set SDWT_CACHE to a writable folder."
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return assets


def write_shapes(folder: Path, side: int = IMAGE_SIDE) -> None:
    """One PNG per entry of `_SHAPES` (a coloured shape on a light background) with its caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (shape, colour, rgb) in enumerate(_SHAPES):
        image = Image.new("RGB", (side, side), (235, 232, 225))
        draw = ImageDraw.Draw(image)
        low, high = side * 0.2, side * 0.8
        if shape == "circle":
            draw.ellipse((low, low, high, high), fill=rgb)
        elif shape == "square":
            draw.rectangle((low, low, high, high), fill=rgb)
        else:
            draw.polygon([(side / 2, low), (high, high), (low, high)], fill=rgb)
        stem = f"{index:02d}-{colour}-{shape}"
        image.save(folder / f"{stem}.png")
        article = "an" if colour[0] in "aeiou" else "a"
        (folder / f"{stem}.txt").write_text(f"{article} {colour} {shape}\n", encoding="utf-8")


def training_preset(assets: DemoAssets, steps: int = 300) -> dict[str, Any]:
    """A textual-inversion request body that teaches the green triangle in a minute or two on a CPU, with
    previews. Overwrite stays off, as everywhere: a second run of the same name asks first."""
    return {
        "method": {"name": NAME, "init_text": "shape", "vectors": 2},
        "data": {"path": str(assets.dataset), "size": TRAINING_SIDE, "template": "subject_filewords"},
        "loop": {
            "steps": steps,
            "save_every": 0,
            "preview_every": max(1, steps // 8),
            "preview_steps": 8,
            "preview_prompt": "a photo of [name]",
        },
    }


def generate_preset() -> dict[str, Any]:
    """Generate-panel defaults for the demo model: small and quick."""
    return {"prompt": f"a photo of {NAME}", "steps": 10, "width": 128, "height": 128}
