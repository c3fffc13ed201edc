"""Pretraining the tiny world's VAE: reconstruct the world's pictures through 8x8x4 latents.

Fully convolutional, so it trains on 32x32 crops (aligned to the 8-pixel latent grid) of the
64x64 pictures, a quarter of the work per picture. Afterwards `calibrate` rescales and centres the
latent space without changing what the decoder makes of it, so that latents times SD1's latent
scale (0.18215) have mean 0 and standard deviation 1 per channel, as the diffusion model expects.
Training state is saved in a work folder, so a run can be stopped and continued.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lib_training.formats.family import ModelFamily
from lib_training.model.networks.vae import AutoencoderKL
from lib_training.world.model import build_world_model
from lib_training.world.scenes import batch

NOISE = 0.1  # decoder noise, relative to the latents' standard deviation
LATENT_PULL = 1e-4
CROP = 32


def _crops(images: Tensor, generator: torch.Generator) -> Tensor:
    """A CROPxCROP piece of each picture [B, 3, 64, 64], at offsets on the 8-pixel grid."""
    B, _, H, _ = images.shape
    offsets = torch.randint(0, (H - CROP) // 8 + 1, (B, 2), generator=generator) * 8
    return torch.stack([img[:, y : y + CROP, x : x + CROP] for img, (y, x) in zip(images, offsets.tolist())])


def vae_loss(vae: AutoencoderKL, images: Tensor, generator: torch.Generator) -> Tensor:
    """Reconstruction from the latent mean plus small noise (a tenth of the latents' spread), with a
    light pull of the latents towards 0: a near-deterministic autoencoder, which learns far faster
    than the KL-weighted one on a CPU budget; `calibrate` then fixes the posterior's spread."""
    mean = vae.encode(images).mean
    noise = torch.randn(mean.shape, generator=generator) * NOISE * mean.detach().std()
    recon = vae.decode(mean + noise)
    return F.mse_loss(recon, images) + F.l1_loss(recon, images) + LATENT_PULL * mean.square().mean()


def train_vae(work: Path, seed: int, steps: int, batch_size: int = 8, lr: float = 2e-3) -> AutoencoderKL:
    """Train (or continue training, from `work/vae-state.pt`) until `steps`; returns the VAE."""
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "vae-state.pt"
    vae = build_world_model(seed=seed).vae_module.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    done = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done = int(state["step"])
    generator = torch.Generator().manual_seed(seed * 1000 + done)
    start = time.perf_counter()
    for step in range(done, steps):
        for group in optimizer.param_groups:  # warm up, then cosine down to a tenth
            warm = min(1.0, (step + 1) / 50)
            group["lr"] = lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / max(steps, 1)))
        images, _ = batch(seed + 7, step * batch_size, batch_size)
        loss = vae_loss(vae, _crops(images, generator), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(
                f"vae step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True
            )
        if (step + 1) % 200 == 0 or step + 1 == steps:
            torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, state_path)
    return vae.requires_grad_(False).eval()


@torch.no_grad()
def calibrate(vae: AutoencoderKL, images: Tensor) -> dict[str, float]:
    """Rescale and centre the latent space in place (the decoded pictures stay the same).

    With m, s the per-channel mean and std of the latent means over `images`, the encoder's mean
    becomes k (z - m) with k = 1 / (s * latent_scale), and post_quant_conv takes the new latent
    back: W z + b = (W / k) z' + (W m + b).
    """
    scale = ModelFamily.parse("sd1").latent_scale
    mean = torch.cat([vae.encode(chunk).mean for chunk in images.split(32)])  # [N, 4, h, w]
    m = mean.mean(dim=(0, 2, 3))  # [4]
    s = mean.std(dim=(0, 2, 3))  # [4]
    k = 1.0 / (s * scale)
    c = vae.config.embed_dim
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= k[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - m) * k
    q.weight[c:] = 0.0  # the posterior's spread: NOISE in scaled units, as in training
    q.bias[c:] = 2.0 * math.log(NOISE / scale)
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight /= k[None, :, None, None]
    return {"mean": m.tolist(), "std": s.tolist()}  # type: ignore[dict-item]


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, seed: int = 54321, count: int = 64) -> float:
    """Mean absolute error (in [-1, 1] units) of reconstructing unseen pictures through the latent means."""
    images, _ = batch(seed, 0, count)
    recon = torch.cat([vae.decode(vae.encode(chunk).mean) for chunk in images.split(16)])
    return float((recon - images).abs().mean())
