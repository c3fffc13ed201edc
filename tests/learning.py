"""How the tests measure that an embedding learned: a loss on a fixed evaluation set, against random
embeddings of the same norm (the noise floor of that loss)."""

from __future__ import annotations

from pathlib import Path

import torch


def fixed_eval_loss(model, images: Path, name: str, vectors, count: int = 16) -> float:
    """Mean loss over a fixed set of (image, noise, timestep), with the prompt 'a photo of NAME'."""
    from lib_training.dataset import DatasetConfig, TrainingDataset

    dataset = TrainingDataset(DatasetConfig(path=str(images), size=64, template="subject"), name=name)
    pictures = torch.stack([dataset.load_image(view) for view in dataset.views()])
    latents = model.encode_images(pictures).repeat_interleave(count // len(pictures) + 1, 0)[:count]
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.linspace(50, 950, count).long()
    with torch.no_grad():
        x_t = model.schedule.add_noise(latents, noise, timesteps)
        cond = model.encode_prompts([f"a photo of {name}"] * count, {name: vectors})
        prediction = model.predict(x_t, timesteps, cond)
        target = model.schedule.target(latents, noise, timesteps)
        return torch.nn.functional.mse_loss(prediction.float(), target.float()).item()


def random_like(vectors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random vectors with the same per-vector norms."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in vectors.items():
        r = torch.randn(v.shape, generator=generator)
        out[key] = r / r.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)
    return out
