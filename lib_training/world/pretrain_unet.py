"""Pretraining the tiny world's UNet: epsilon prediction on SD1's noise schedule, captions dropped for CFG.

The text encoder is frozen, so every caption's context is computed once; the VAE is trained
first, so every picture's latent is computed once (`prepare`). A training step is then only the
UNet: noise a batch of latents at uniform timesteps, predict the noise, mean squared error.

Captions say the whole scene ("a red circle on a dark background") 30% of the time, a part of it
("a red circle", "a circle on a dark background", "something red on a dark background", "a red
shape") 30%, so the UNet learns to read colour and shape apart: what lets a method teach a colour
and shape never seen together; 20% in the form prompts take in previews ("a photo of a red circle",
"a photo of a red circle, on a dark background", "a photo of red circle"); and 20% in the phrasings
of the default training template ("a close-up photo of a red circle, on a dark background", "a dim
photo of the red circle, ...": `TEMPLATE_LINES`), as a real model knows such words from its captions.
Without these, a method's training prompts are full of words the UNet never saw, and a taught concept
comes out in some of them and not in others.
One caption in ten is dropped (empty), for classifier-free guidance. The UNet's exponential moving
average is what ships. The loss is the mean squared error of the predicted noise, plus that of its
mean over the picture weighted as the sampler magnifies it at high noise (see `diffusion_loss`):
without it, a small UNet denoises well yet samples washed-out colours.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lib_training.dataset.templates import load_template
from lib_training.model.networks.unet import UNetModel
from lib_training.model.standalone import StandaloneModel
from lib_training.world.scenes import BACKGROUNDS, article, batch, caption, pretraining_pairs

CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.995
DC_WEIGHT = 0.1  # weight of the error in the picture's mean colour at high noise (see diffusion_loss)
DC_MAGNIFY_CAP = 100.0
# The lines of the default training template ("a close-up photo of a [name], [filewords]", ...), which
# prompts take when a method trains on the world: the subject there is the colour and the shape.
TEMPLATE_LINES = tuple(load_template("subject_filewords").lines)


def _template_caption(line: str, colour: str, shape: str, background: str) -> str:
    return line.replace("[name]", f"{colour} {shape}").replace("[filewords]", f"on a {background} background")


# (probability, how the caption is made from (colour, shape, background))
CAPTION_KINDS = (
    (0.3, lambda c, s, b: caption(c, s, b)),
    (0.1, lambda c, s, b: caption(c, s)),
    (0.08, lambda c, s, b: f"{article(s)} {s} on a {b} background"),
    (0.08, lambda c, s, b: f"something {c} on a {b} background"),
    (0.04, lambda c, s, b: f"{article(c)} {c} shape"),
    # the way prompts are written for a method's training and previews ("a photo of a [name], [filewords]")
    (0.08, lambda c, s, b: f"a photo of {caption(c, s)}"),
    (0.08, lambda c, s, b: f"a photo of {caption(c, s)}, on a {b} background"),
    (0.04, lambda c, s, b: f"a photo of {c} {s}"),
    *((0.2 / len(TEMPLATE_LINES), partial(_template_caption, line)) for line in TEMPLATE_LINES),
)


def captions_key() -> str:
    """A short digest of `all_captions()`: prepared data (`prepare`) is only reused for the same captions."""
    return hashlib.sha256("\n".join(all_captions()).encode()).hexdigest()[:8]


def all_captions() -> list[str]:
    """Every caption pretraining uses, the empty one first."""
    seen = {"": None}
    for colour, shape in pretraining_pairs():
        for background in BACKGROUNDS:
            for _, make in CAPTION_KINDS:
                seen.setdefault(make(colour, shape, background), None)
    return list(seen)


@torch.no_grad()
def prepare(model: StandaloneModel, seed: int, count: int) -> dict[str, Tensor]:
    """Latents [count, 4, 8, 8] of pretraining scenes, contexts [K, 77, 128] of all captions, and per
    scene the index of each kind of caption [count, len(CAPTION_KINDS)]."""
    captions = all_captions()
    contexts = torch.cat([model.encode_prompts(captions[i : i + 64]).context for i in range(0, len(captions), 64)])
    latents, kinds = [], []
    for start in range(0, count, 32):
        images, drawn = batch(seed, start, min(32, count - start), "pretrain")
        latents.append(model.encode_images(images))
        for s in drawn:
            kinds.append([captions.index(make(s.colour, s.shape, s.background)) for _, make in CAPTION_KINDS])
    return {"latents": torch.cat(latents).float(), "contexts": contexts.float(), "kinds": torch.tensor(kinds)}


def diffusion_loss(
    unet: UNetModel, alphas_cumprod: Tensor, data: dict[str, Tensor], rng: np.random.Generator, batch_size: int
) -> Tensor:
    """Epsilon-prediction loss on one random batch of `data` (see `prepare`)."""
    index = torch.from_numpy(rng.integers(len(data["latents"]), size=batch_size))
    x0 = data["latents"][index]
    flip = torch.from_numpy(rng.random(batch_size) < 0.5)  # every shape is mirror-symmetric
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    probs = np.array([p for p, _ in CAPTION_KINDS])
    kind = rng.choice(len(CAPTION_KINDS), size=batch_size, p=probs / probs.sum())
    chosen = data["kinds"][index, torch.from_numpy(kind)]
    chosen = torch.where(torch.from_numpy(rng.random(batch_size) < CAPTION_DROPOUT), 0, chosen)
    context = data["contexts"][chosen]  # [B, 77, 128]
    t = torch.from_numpy(rng.integers(len(alphas_cumprod), size=batch_size))
    noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    a = alphas_cumprod[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    error = unet(x_t, t, context) - noise  # [B, 4, h, w]
    # The picture's mean per latent channel (its colours and brightness) is set at high noise, where
    # an error in the predicted noise is magnified sqrt((1 - a) / a) times (up to 15) in the picture:
    # weight that error the way the sampler sees it.
    magnify = ((1 - a) / a).clamp(max=DC_MAGNIFY_CAP).flatten()  # [B]
    dc = error.mean(dim=(2, 3)).square().mean(dim=1)  # [B]
    return error.square().mean() + DC_WEIGHT * (magnify * dc).mean()


def train_unet(
    model: StandaloneModel,
    data: dict[str, Tensor],
    work: Path,
    seed: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    budget_s: float | None = None,
) -> tuple[UNetModel, int]:
    """Train the model's UNet (continuing from `work/unet-state.pt`) up to `steps` or `budget_s`
    seconds; returns the moving average of the UNet and the step reached."""
    state_path = work / "unet-state.pt"
    unet = model.unet_module.requires_grad_(True).train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    done = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        done = int(state["step"])
    rng = np.random.default_rng([seed, done])
    ac = model.schedule.alphas_cumprod.float()
    start = time.perf_counter()

    def save(step: int) -> None:
        state = {"model": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        torch.save(state, state_path)

    step = done
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        loss = diffusion_loss(unet, ac, data, rng, batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        step += 1
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            print(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if step % 250 == 0:
            save(step)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    save(step)
    unet.requires_grad_(False).eval()
    return ema, step
