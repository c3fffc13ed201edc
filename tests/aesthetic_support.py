"""Tiny CLIP models for the aesthetic-gradient tests: an open_clip configuration registered under a
name, with random weights in a local file (tests never download)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from PIL import Image, ImageDraw

from lib_training.aesthetic.clip_model import ClipSource
from lib_training.formats.tensor_files import save_safetensors

IMAGE_SIZE = 32


def tiny_clip(folder: Path, text_width: int, embed_dim: int = 32, seed: int = 0) -> ClipSource:
    """A registered tiny CLIP (`tiny-clip-T-E`) whose text tower is `text_width` wide and whose
    features are `embed_dim` wide, with seeded random weights written to FOLDER/NAME.safetensors."""
    name = f"tiny-clip-{text_width}-{embed_dim}"
    config = {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": 2},
    }
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    weights = folder / f"{name}-seed{seed}.safetensors"
    if not weights.exists():
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
        with torch.no_grad():
            model.text_projection.normal_(std=text_width**-0.5)
        save_safetensors(weights, {k: v.contiguous() for k, v in model.state_dict().items()})
    return ClipSource(model=name, pretrained="", weights=weights)


def picture_folder(folder: Path, count: int = 5) -> Path:
    """`count` small distinct pictures (circles of different colours and places)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (40 + 8 * i, 48), (30 * i, 200 - 20 * i, 90))
        ImageDraw.Draw(image).ellipse((4 + 2 * i, 6, 30 + i, 40), fill=(240, 40 + 30 * i, 30))
        image.save(folder / f"{i:03d}.png")
    return folder
