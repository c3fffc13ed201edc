"""Settings of the training loop shared by every method."""

from __future__ import annotations

from dataclasses import dataclass

from lib_training.model.memory_format import CHANNELS_LAST_SETTINGS
from lib_training.options import option
from lib_training.training.compiled import COMPILE_SETTINGS

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CLIP_MODES = ("none", "value", "norm")
LATENT_SAMPLING = ("once", "mean", "random")
SAMPLERS = ("euler", "ddim")


@dataclass
class LoopConfig:
    """How to train: steps, optimiser, precision, saving and previews."""

    steps: int = option(1000, "Optimizer steps to train for.", min=1, max=10_000_000)
    batch_size: int = option(1, "Images per step.", min=1, max=1024)
    grad_accumulation: int = option(
        1,
        "Batches whose gradients add up before each optimizer step (a larger effective batch).",
        min=1,
        max=1024,
    )
    lr: str = option(
        "0.005",
        "Learning rate: a number, or a schedule like '0.005:100, 1e-3:1000, 1e-5' (value until step, ...).",
        flag="--lr",
        label="Learning rate",
    )
    lr_scheduler: str = option(
        "constant",
        "Shape of the learning rate over training (with a single-number learning rate).",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"),
        advanced=True,
    )
    lr_warmup_steps: int = option(0, "Steps over which the learning rate rises from 0.", min=0, advanced=True)
    lr_cycles: int = option(1, "Restarts of cosine_with_restarts.", min=1, advanced=True)
    optimizer: str = option(
        "adamw",
        "Optimizer (adamw8bit needs bitsandbytes, prodigy needs prodigyopt).",
        choices=("adamw", "adamw8bit", "prodigy"),
    )
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0, max=1.0, advanced=True)
    clip_grad: str = option("none", "Gradient clipping: off, by value or by norm.", choices=CLIP_MODES, advanced=True)
    clip_grad_value: str = option(
        "1.0", "Clipping limit: a number or a schedule in the learning-rate syntax.", advanced=True
    )
    precision: str = option(
        "auto",
        "Compute precision: auto is fp16 or bf16 autocast on a GPU and fp32 on the CPU. Trained "
        "parameters always stay in fp32.",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: less memory, slower.")
    checkpoint_blocks: float = option(
        1.0,
        "With gradient checkpointing: the fraction of UNet blocks recomputed, highest resolution first "
        "(1: all; less saves less memory but costs less time). A WebUI's own UNet recomputes all its blocks.",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    channels_last: str = option(
        "auto",
        "Store UNet and VAE weights channels-last (NHWC), as GPU convolutions prefer: auto is on for a GPU and "
        "off on the CPU. The model is restored afterwards.",
        choices=CHANNELS_LAST_SETTINGS,
        advanced=True,
    )
    compile: str = option(
        "auto",
        "Compile the UNet call of each step with torch.compile (once per bucket shape): auto is on for a GPU "
        "where torch.compile works and off on the CPU; cuda-graphs also replays each shape's kernels as CUDA "
        "graphs (fewer launches; a GPU with Triton, one UNet call per step), else runs as auto. A failed "
        "compile falls back with a message.",
        choices=COMPILE_SETTINGS,
        advanced=True,
    )
    min_snr_gamma: float = option(
        0.0, "Min-SNR-gamma loss weighting (5 is usual); 0 turns it off.", min=0.0, max=100.0, advanced=True
    )
    multires_noise_iterations: int = option(
        0,
        "Multi-resolution noise: coarser noise levels added (6-10 is usual); 0 turns it off.",
        min=0,
        max=20,
        advanced=True,
    )
    multires_noise_discount: float = option(
        0.3,
        "Weight of each coarser level of multi-resolution noise, to the power of its level.",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    noise_offset: float = option(
        0.0,
        "Noise offset (0.05-0.1 helps very dark or bright images); 0 turns it off.",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    latent_sampling: str = option(
        "once",
        "How images become latents: once (one sample per image, cached), mean (deterministic), "
        "random (a new sample each step).",
        choices=LATENT_SAMPLING,
        advanced=True,
    )
    cache_latents_to_disk: bool = option(
        False, "Keep encoded latents on disk too, so a resumed or repeated run skips the VAE.", advanced=True
    )
    cache_text_outputs: bool = option(
        False,
        "When the text encoders don't train: encode every prompt the run can use before the first step and "
        "keep the text encoders off the GPU while training (less GPU memory; they come back afterwards). "
        "Prompts must be fixed: not with tag shuffle or tag dropout.",
        advanced=True,
    )
    cache_text_outputs_to_disk: bool = option(
        False,
        "Keep the cached text-encoder outputs on disk too (cache_text_outputs with it), so a resumed or "
        "repeated run skips the text encoders.",
        advanced=True,
    )
    seed: int = option(0, "Seed of every random choice: same seed, same result.", min=0)
    save_every: int = option(500, "Save a numbered copy every N steps (0: only at the end).", min=0)
    validate_every: int = option(
        0,
        "Measure the loss of the held-out images (the data's validation_images) every N steps; 0: at the end only.",
        min=0,
        advanced=True,
    )
    preview_every: int = option(500, "Make a preview image every N steps (0: none).", min=0)
    preview_prompt: str = option(
        "", "Prompt of the preview images; [name] is the name being trained. Empty: a line of the template."
    )
    preview_negative: str = option("", "Negative prompt of the preview images.", advanced=True)
    preview_seed: int = option(0, "Seed of the preview images.", min=0, advanced=True)
    preview_steps: int = option(20, "Sampling steps of the preview images.", min=1, max=150, advanced=True)
    preview_cfg: float = option(7.0, "Guidance scale of the preview images.", min=1.0, max=30.0, advanced=True)
    preview_sampler: str = option("euler", "Sampler of the preview images.", choices=SAMPLERS, advanced=True)
    preview_size: int = option(
        0, "Side of the preview images in pixels (0: the training size).", min=0, max=4096, advanced=True
    )
