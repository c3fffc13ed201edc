"""Hypernetwork learning rates: the evaluation loss after training at each rate, as a ratio of the loss
without the hypernetwork (below 1: it learned; rising again at higher rates: the rate undoes it).

Trains a 1-2-1 hypernetwork (auto widths) on a tiny random model over three synthetic images with
the real trainer, then measures the loss on a fixed set of (image, noise, timestep) with the
hypernetwork applied. This is how the default learning rate was chosen (README, "Hypernetworks").

    python bench/hypernetwork_lr.py                       # tiny SD1, 100 steps, 5e-6 ... 5e-3
    python bench/hypernetwork_lr.py --arch sdxl --steps 200 --lrs 1e-5,1e-4,1e-3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(folder: Path) -> None:
    for i, background in enumerate([(20, 120, 200), (30, 160, 60), (200, 200, 40)]):
        image = Image.new("RGB", (64, 64), background)
        offset = 8 + 4 * i
        ImageDraw.Draw(image).ellipse((offset, offset, offset + 36, offset + 36), fill=(240, 40, 30))
        image.save(folder / f"{i:05d}-a red ball.png")


def eval_loss(model, folder: Path, method, count: int = 16) -> float:
    """Mean loss over a fixed set of (image, noise, timestep) for 'a photo of a red ball'."""
    import contextlib

    from lib_training.dataset import DatasetConfig, TrainingDataset

    dataset = TrainingDataset(DatasetConfig(path=str(folder), size=64, template="filewords"), name="hn")
    pictures = torch.stack([dataset.load_image(view) for view in dataset.views()])
    latents = model.encode_images(pictures).repeat_interleave(count // len(pictures) + 1, 0)[:count]
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.linspace(50, 950, count).long()
    applied = method.apply_for_generation(model) if method else contextlib.nullcontext()
    with torch.no_grad(), applied:
        x_t = model.schedule.add_noise(latents, noise, timesteps)
        prediction = model.predict(x_t, timesteps, model.encode_prompts(["a photo of a red ball"] * count))
        target = model.schedule.target(latents, noise, timesteps)
        return torch.nn.functional.mse_loss(prediction.float(), target.float()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", default="5e-6,5e-5,5e-4,5e-3")
    args = parser.parse_args()

    from lib_training.dataset import DatasetConfig
    from lib_training.methods.hypernetwork import HypernetworkConfig, HypernetworkMethod
    from lib_training.model.standalone import load_model
    from lib_training.model.tiny import make_tiny
    from lib_training.training.config import LoopConfig
    from lib_training.training.run import train

    with tempfile.TemporaryDirectory(prefix="bench-hn-lr-") as root:
        folder = Path(root) / "images"
        folder.mkdir()
        make_images(folder)
        make_tiny(args.arch, seed=0).save(Path(root) / "tiny.safetensors")
        model = load_model(Path(root) / "tiny.safetensors")
        base = eval_loss(model, folder, None)
        print(f"tiny {args.arch}, {args.steps} steps, AdamW; evaluation loss without a hypernetwork {base:.4f}")
        for lr in args.lrs.split(","):
            started = time.perf_counter()
            loop = LoopConfig(steps=args.steps, save_every=0, preview_every=0, latent_sampling="mean", lr=lr)
            data = DatasetConfig(path=str(folder), size=64, template="filewords")
            result = train(model, HypernetworkMethod(HypernetworkConfig(name="hn")), data, loop, Path(root) / lr)
            after = eval_loss(model, folder, HypernetworkMethod.load(result.result, model))
            print(f"  lr {lr:>8s}: evaluation loss {after:.4f}, ratio to without {after / base:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
