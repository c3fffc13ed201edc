"""What the LoRA tests share: a small captioned dataset, a small LoRA, model state and outputs."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from lib_training.dataset import DatasetConfig
from lib_training.formats.fingerprint import hooks_snapshot, requires_grad_snapshot, weights_fingerprint
from lib_training.methods.lora import LoraConfig, LoraMethod
from lib_training.training.config import LoopConfig

FAST = LoopConfig(steps=8, save_every=0, preview_every=0, latent_sampling="mean", lr="0.001")


def _image(path: Path, background: tuple[int, int, int], seed: int) -> None:
    picture = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(picture)
    offset = 8 + 4 * seed
    draw.ellipse((offset, offset, offset + 36, offset + 36), fill=(240, 40, 30))
    picture.save(path)


def make_red_balls(folder: Path) -> Path:
    """Three 64 px images of a red ball on different backgrounds, captioned "zqx, red ball, ..."."""
    for i, background in enumerate([(20, 120, 200), (30, 160, 60), (200, 200, 40)]):
        _image(folder / f"{i:05d}.png", background, i)
        (folder / f"{i:05d}.txt").write_text(f"zqx, red ball, {['blue', 'green', 'yellow'][i]} background")
    return folder


def data(folder: Path, **changes) -> DatasetConfig:
    return DatasetConfig(path=str(folder), size=64, template="filewords", **changes)


def small_lora(**changes) -> LoraMethod:
    return LoraMethod(LoraConfig(**{"name": "zqx", "rank": 4, "alpha": 2.0, **changes}))


def randomise(method: LoraMethod, seed: int = 0) -> None:
    """Non-zero up weights (and magnitudes), as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in method.network.lora.values():
            module.up.copy_(torch.randn(module.up.shape, generator=generator) * 0.05)
            if module.dora_scale is not None:
                module.dora_scale.mul_(1 + 0.1 * torch.rand(module.dora_scale.shape, generator=generator))


def outputs(model, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = model.encode_prompts(["a red ball", "a blue cube on a table"])
        return model.predict(x_t, torch.tensor([100, 700]), cond)


def model_state(model):
    return weights_fingerprint(model.modules), hooks_snapshot(model.modules), requires_grad_snapshot(model.modules)
