"""`python -m lib_training world pretrain`: build the tiny world model from a seed, resumably.

Stages, each continuing from what the work folder holds: the VAE (`pretrain_vae`), then the
latents and caption contexts (`pretrain_unet.prepare`), then the UNet (`pretrain_unet`). Each
stage's result is written to the shipped weights folder as fp16 shards, and the pretrained model
is scored on the training prompts (`training_prompt_score`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_training.model.standalone import StandaloneModel
from lib_training.world.classifier import load_classifier
from lib_training.world.evaluate import Expectation, Score, evaluate
from lib_training.world.model import WEIGHTS_DIR, build_world_model, load_shipped, save_shipped
from lib_training.world.pretrain_unet import captions_key, prepare, train_unet
from lib_training.world.pretrain_vae import calibrate, reconstruction_error, train_vae
from lib_training.world.scenes import BACKGROUNDS, HELD_OUT_PAIRS, batch, caption, pretraining_pairs


@dataclass(frozen=True)
class PretrainPlan:
    seed: int = 0
    vae_steps: int = 750
    unet_steps: int = 2000
    scenes: int = 3000  # pretraining pictures whose latents the UNet learns from
    budget_s: float | None = None  # stop the UNet stage after this long (continue with another call)
    batch_size: int = 16  # UNet batch
    lr: float = 1e-3  # UNet peak learning rate


def training_prompts() -> list[Expectation]:
    """Every pretraining (colour, shape) pair on each background, as its full caption."""
    return [Expectation(caption(c, s, b), s, c, b) for c, s in pretraining_pairs() for b in BACKGROUNDS]


def held_out_prompts() -> list[Expectation]:
    return [Expectation(caption(c, s, b), s, c, b) for c, s in HELD_OUT_PAIRS for b in BACKGROUNDS]


def training_prompt_score(model: StandaloneModel, seeds: tuple[int, ...] = (0,)) -> Score:
    return evaluate(model, load_classifier(), training_prompts(), seeds)


def pretrain(work: Path, plan: PretrainPlan, weights: Path = WEIGHTS_DIR) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not list(weights.glob("vae-*.safetensors")):
        vae = train_vae(work, plan.seed, plan.vae_steps)
        images, _ = batch(plan.seed + 11, 0, 512)
        stats = calibrate(vae, images)
        print(f"vae latent mean {stats['mean']} std {stats['std']} (before calibration)")
        print(f"vae reconstruction error {reconstruction_error(vae):.4f} (mean |error| in [-1, 1] units)")
        save_shipped("vae", vae.state_dict(), weights)
    model = build_world_model(vae_state=load_shipped("vae", weights), seed=plan.seed)
    data_path = work / f"unet-data-{plan.scenes}-{captions_key()}.pt"  # latents, caption contexts
    if data_path.is_file():
        data = torch.load(data_path, weights_only=True)
    else:
        data = prepare(model, plan.seed, plan.scenes)
        torch.save(data, data_path)
    if (work / "unet-state.pt").is_file() is False and list(weights.glob("unet-*.safetensors")):
        print("note: shipped UNet weights exist but no training state: training starts afresh")
    ema, reached = train_unet(
        model, data, work, plan.seed, plan.unet_steps, plan.batch_size, plan.lr, budget_s=plan.budget_s
    )
    save_shipped("unet", ema.state_dict(), weights)
    took = time.perf_counter() - start
    print(f"unet at step {reached}/{plan.unet_steps}; this call took {took:.0f} s; wrote {weights}")
