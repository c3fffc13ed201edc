"""Textual-inversion training steps: ours against the diffusers recipe, on the same weights and batches.

Ours is the real training path, `lib_training.training.run.train` with an `EmbeddingMethod` over a
synthetic image folder; its time per step comes from the progress callback, after warm-up steps
(latent caching comes before the first step and is not timed). The reference is the standard
diffusers textual-inversion recipe, written here with diffusers' `UNet2DConditionModel` and
transformers' CLIP text models holding the same weights: rows for the placeholder tokens are
appended to each token-embedding matrix (`resize_token_embeddings`), the whole matrix trains under
AdamW, and after every optimizer step all other rows are put back ("index_no_updates"). For SDXL
both text encoders' matrices train, as ours trains a clip_l and a clip_g part.

Both see the same latents (from the same VAE, precomputed for the reference, as ours caches them),
the same prompts as token ids (placeholder ids where ours places its vectors), the same noise,
timesteps and SDXL size conditioning at every step, with the same learning rate and AdamW settings;
the losses of the first step, taken before any update, are compared to show it.

Each implementation runs in its own subprocess. Time per step: the median (and the fastest) over
the timed steps. Peak memory: on the CPU the growth of the peak resident set (VmHWM, reset after the
warm-up) over the timed steps, and that peak in total, weights included; on a GPU torch's peak
allocated memory, the same two ways. Prints both, and the ratios ours/reference. Target: time and
memory ratios at most 1.

Achieved TFLOP/s: the FLOPs of one more step after the timed ones (untimed; counted by
torch.utils.flop_counter's FlopCounterMode on the same shapes) over the median step time.
`--compile` turns on ours' compiled UNet call (LoopConfig.compile; off otherwise, so that the default
run measures the eager path), `--cuda-graphs` the compiled call with CUDA graphs (compile cuda-graphs);
`--channels-last` is passed to ours as it is (auto: on for CUDA).

CPU times are only comparable on an otherwise idle machine: the CPU pressure (Linux PSI) during
each run is printed beside it. When other work competes for the cores, multi-threaded steps slow
down erratically (threads wait for each other); `--threads 1` keeps the comparison steady then.

    python bench/train_embedding.py                 # SD1 and SDXL shapes on the CPU, see below
    python bench/train_embedding.py --arch sd1 --steps 3
    python bench/train_embedding.py --device cuda --full     # full-size SD1.5 and SDXL, bf16
    python bench/train_embedding.py --device cuda --full --compile   # ours with the compiled step
    python bench/train_embedding.py --device cuda --full --cuda-graphs   # ... and CUDA graphs
    python bench/train_embedding.py --tiny --steps 2 --warmup 1   # tiny models: a quick check

Default shapes (CPU): SD1 = SD1.5's UNet structure at width 64 with the full-size CLIP-L; SDXL =
SDXL's UNet structure at width 64 with 2 transformer blocks per attention level and the full-size
CLIP-L and OpenCLIP bigG; the VAE is tiny (it only matters for latent caching); 256 px, batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timing import (
    DTYPES,
    StepRecorder,
    add_run_arguments,
    child_argv,
    describe_run,
    fastest,
    finish_run_arguments,
    relative_difference,
    run_rounds,
    run_worker,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAME = "zqx"  # the embedding's name: the word that places its vectors in a prompt
INIT_TEXT = "ball"  # its vectors start from this text's token embeddings
LR = 0.005  # A1111's default textual-inversion learning rate
WEIGHT_DECAY = 0.0
BETAS = (0.9, 0.999)
EPS = 1e-8
SEED = 0
TEMPLATE = "subject"  # "a photo of a [name]", ...
ARCHS = ("sd1", "sdxl")
IMPLS = ("ours", "reference")
SDXL_G_PREFIX = "conditioner.embedders.1.model."  # where an SDXL checkpoint keeps OpenCLIP bigG
SIZE_EMBED_DIM = 256  # SDXL embeds each of its six size values with a 256-wide sinusoid
VAE_CH_MULT = [1, 2, 4, 4]  # the VAE ch_mult diffusers reads for its UNet config (8x downsampling)


# --- shapes and models --------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """What one benchmark case trains on."""

    family: Any  # ModelFamily
    unet: Any  # UNetConfig
    vae: Any  # VAEConfig
    text: tuple[Any, ...]  # TextEncoderConfig per text encoder
    size: int  # image side in pixels


def model_shapes(arch: str, args: argparse.Namespace) -> Shapes:
    """The model structure and image size of `arch` at the chosen scale (--tiny, default, --full)."""
    from lib_training.formats.family import ModelFamily
    from lib_training.model.networks.text_encoder import TextEncoderConfig
    from lib_training.model.networks.unet import UNetConfig
    from lib_training.model.networks.vae import VAEConfig

    family = ModelFamily.parse(arch)
    if args.tiny:
        text = TextEncoderConfig.for_arch(family.arch, tiny=True)
        return Shapes(family, UNetConfig.tiny(family.arch), VAEConfig.tiny(), text, args.size or 64)
    text = TextEncoderConfig.for_arch(family.arch)
    if args.full:
        unet = UNetConfig.sdxl_base() if family.is_sdxl else UNetConfig.sd15()
        return Shapes(family, unet, VAEConfig.sd(), text, args.size or family.default_size)
    if family.is_sdxl:
        depth = (0, args.sdxl_depth, args.sdxl_depth)
        unet = replace(
            UNetConfig.sdxl_base(),
            model_channels=args.width,
            transformer_depth=depth,
            transformer_depth_middle=args.sdxl_depth,
        )
        if args.bigg_layers:
            text = (text[0], replace(text[1], layers=args.bigg_layers))
    else:
        unet = replace(UNetConfig.sd15(), model_channels=args.width)
    return Shapes(family, unet, VAEConfig.tiny(), text, args.size or 256)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_model(shapes: Shapes, device: torch.device, dtype: torch.dtype):  # -> StandaloneModel
    """Our model with seeded random weights (the same in every process), on `device` in `dtype`.

    As when loading a checkpoint, SDXL's VAE stays fp32 when the rest is fp16.
    """
    from lib_training.model.standalone import assemble, build_random

    model = build_random(shapes.family, shapes.unet, shapes.vae, shapes.text, SEED)
    if device.type == "cpu" and dtype == torch.float32:
        return model
    vae_dtype = torch.float32 if shapes.family.is_sdxl and dtype == torch.float16 else dtype
    for name, module in model.modules.items():
        module.to(device=device, dtype=vae_dtype if name == "vae" else dtype)
    encoders = list(model.text_encoders)
    return assemble(
        shapes.family, model.unet_module, model.vae_module, encoders, device=device, dtype=dtype, vae_dtype=vae_dtype
    )


def make_images(folder: Path, count: int, size: int) -> None:
    """`count` seeded synthetic square PNGs of side `size`: a colour gradient with a few shapes."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = random.Random(index)
        top, bottom = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        image = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(image)
        for y in range(size):
            mix = y / max(1, size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * mix) for a, b in zip(top, bottom)))
        for _ in range(4):
            x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
            extent = rng.randrange(size // 8, size // 2)
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x0, y0, x0 + extent, y0 + extent), fill=colour)
        image.save(folder / f"{index:03d}.png")


# --- measuring ---------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- ours ---------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, shapes: Shapes) -> dict[str, Any]:
    """Train with lib_training's trainer; time and memory from its progress callback."""
    from torch.utils.flop_counter import FlopCounterMode

    from lib_training.dataset import DatasetConfig
    from lib_training.methods.embedding import EmbeddingConfig, EmbeddingMethod
    from lib_training.training.config import LoopConfig
    from lib_training.training.run import train

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    total = args.warmup + args.steps
    model = build_model(shapes, device, dtype)
    method = EmbeddingMethod(EmbeddingConfig(name=NAME, init_text=INIT_TEXT, vectors=args.vectors))
    data = DatasetConfig(path=args.data, size=shapes.size, template=TEMPLATE)
    loop = LoopConfig(
        steps=total + 1,  # the last one (untimed) counts FLOPs
        batch_size=args.batch,
        lr=str(LR),
        weight_decay=WEIGHT_DECAY,
        precision=args.dtype,
        seed=SEED,
        save_every=0,
        preview_every=0,
        latent_sampling="mean",
        compile="cuda-graphs" if args.cuda_graphs else "on" if args.compile else "off",
        channels_last=args.channels_last,
    )
    recorder = StepRecorder(args.warmup, total, device)
    flops = FlopCounterMode(display=False)

    def on_progress(progress) -> None:
        if progress.phase == "training" and progress.step <= total:
            recorder.step_done(progress.step, progress.loss)
            if progress.step == total:
                flops.__enter__()
        if progress.message:
            print(progress.message, file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-ti-out-") as out:
        try:
            train(model, method, data, loop, out, on_progress=on_progress)
        finally:
            flops.__exit__(None, None, None)
    components = {name: parameter_count(module) for name, module in model.modules.items()}
    return {
        **recorder.result(),
        **recorder.memory_result,
        "trained_parameters": sum(p.numel() for p in method.parameters()),
        "components": components,
        "flops": float(flops.get_total_flops()),
    }


# --- the reference: the diffusers recipe --------------------------------------------------------
@dataclass
class ReferenceBatch:
    """Everything the reference needs for one step, exactly as ours draws it."""

    latents: torch.Tensor  # [B, 4, h, w] scaled latents, fp32
    noise: torch.Tensor  # [B, 4, h, w]
    timesteps: torch.Tensor  # [B] int64
    ids: list[torch.Tensor]  # per text encoder [B, 77], placeholder ids where ours puts its vectors
    time_ids: torch.Tensor | None  # [B, 6] SDXL sizes: original (h, w), crop (top, left), target (h, w)


def reference_batches(
    model, args: argparse.Namespace, shapes: Shapes, total: int, vectors: int, template: str = TEMPLATE
) -> list[ReferenceBatch]:
    """The batches of ours for steps 1..total: same order, prompts, latents, noise and timesteps; with
    `vectors` > 0, NAME's tokens become that many placeholder ids (an embedding's), else it stays a word.

    Follows the trainer: the dataset seeded with the run's seed, the cached mean latents scaled by
    the family's factor, noise and timesteps from a generator seeded by (seed, "noise", step, epoch,
    batch position).
    """
    from lib_training.dataset import DatasetConfig, TrainingDataset
    from lib_training.model.prompt import tokenize
    from lib_training.seeding import derive_seed

    dataset = TrainingDataset(DatasetConfig(path=args.data, size=shapes.size, template=template, seed=SEED), NAME)
    sampler = dataset.sampler(args.batch)
    means: dict[Any, torch.Tensor] = {}
    batches = []
    for step in range(total):
        plan = next(sampler)
        batch = dataset.batch(plan, load_images=False)
        for view in batch.views:
            if view not in means:
                with torch.no_grad():
                    image = dataset.load_image(view)[None]
                    means[view] = model.encode_latent_distribution(image).mean[0].cpu()
        latents = torch.stack([means[view] for view in batch.views]) * model.family.latent_scale
        generator = torch.Generator().manual_seed(derive_seed(SEED, "noise", step, plan.epoch, plan.position))
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, model.schedule.num_steps, (latents.shape[0],), generator=generator)
        ids = []
        for encoder in model.text_encoders:
            tokens = tokenize(batch.prompts, encoder.tokenizer, {NAME: vectors} if vectors else {})
            if tokens.chunks != 1:
                raise ValueError("the benchmark's prompts must fit in one 75-token chunk")
            chunk = tokens.ids[:, 0].clone()  # [B, 77]
            vocab = encoder.token_embedding.num_embeddings
            for slot in tokens.slots:
                chunk[slot.row, slot.position : slot.position + vectors] = torch.arange(vocab, vocab + vectors)
            ids.append(chunk)
        time_ids = None
        if shapes.family.is_sdxl:
            rows = [(*original, *crop, *batch.target_size) for original, crop in zip(batch.original_sizes, batch.crops)]
            time_ids = torch.tensor(rows, dtype=torch.float32)
        batches.append(ReferenceBatch(latents, noise, timesteps, ids, time_ids))
    return batches


def diffusers_unet(unet) -> torch.nn.Module:  # our UNetModel -> UNet2DConditionModel, same weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = unet.config
    state = {"model.diffusion_model." + k: v.detach().float().cpu() for k, v in unet.state_dict().items()}
    section = "network_config" if config.adm_in_channels is not None else "unet_config"
    original = {
        "model": {
            "params": {
                section: {"params": config.ldm_params()},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": VAE_CH_MULT}}},
            }
        }
    }
    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    if config.adm_in_channels is not None:
        # diffusers recognises SDXL's vector conditioning by its context width; say it for any width.
        unet_config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SIZE_EMBED_DIM,
            class_embed_type=None,
            projection_class_embeddings_input_dim=config.adm_in_channels,
        )
    with torch.device("meta"):
        reference = UNet2DConditionModel(**unet_config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), strict=True, assign=True)
    if any(t.is_meta for t in [*reference.parameters(), *reference.buffers()]):
        raise RuntimeError("the diffusers UNet was left with tensors on the meta device")
    return reference


def hf_text_encoder(encoder, start: torch.Tensor) -> torch.nn.Module:
    """Our CLIP text tower as transformers' CLIPTextModel (WithProjection for bigG), same weights, fp32,
    with `start` [n, width] appended to its token embeddings as the placeholder tokens' rows."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lib_training.model.networks.text_encoder import open_clip_to_hf
    from lib_training.model.networks.tokenizer import BOS_ID, EOS_ID

    config = encoder.config
    hf_config = CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=4 * config.width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.context_length,
        hidden_act=config.activation,
        layer_norm_eps=1e-5,
        projection_dim=config.projection_dim or config.width,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # pools at the first EOS, not at the highest id (a placeholder)
        pad_token_id=config.pad_id,
    )
    state = {k: v.detach().float().cpu() for k, v in encoder.state_dict().items()}
    if config.pooled_output:
        reference = CLIPTextModelWithProjection(hf_config)
        checkpoint = {SDXL_G_PREFIX + k: v for k, v in state.items()}
        reference.load_state_dict(convert_open_clip_checkpoint(reference, checkpoint, prefix=SDXL_G_PREFIX))
    else:
        reference = CLIPTextModel(hf_config)
        reference.load_state_dict(open_clip_to_hf(state), strict=True)
    vocab = config.vocab_size
    reference.resize_token_embeddings(vocab + start.shape[0], mean_resizing=False)
    with torch.no_grad():
        reference.get_input_embeddings().weight[vocab:] = start
    # The recipe freezes everything but the token embeddings, and trains the text encoder in train mode.
    reference.requires_grad_(False)
    reference.get_input_embeddings().weight.requires_grad_(True)
    return reference.train()


def run_reference(args: argparse.Namespace, shapes: Shapes) -> dict[str, Any]:
    """The diffusers recipe's training loop over the same batches as ours."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from lib_training.methods.embedding import initial_vectors

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    total = args.warmup + args.steps

    model = build_model(shapes, device, dtype)
    batches = reference_batches(model, args, shapes, total + 1, args.vectors)  # the last one (untimed) counts FLOPs
    unet = diffusers_unet(model.unet_module).requires_grad_(False)
    encoders = [hf_text_encoder(e, initial_vectors(e, INIT_TEXT, args.vectors).cpu()) for e in model.text_encoders]
    vae = model.vae_module  # unused (latents are precomputed), but the recipe keeps its VAE on the device
    del model
    gc.collect()

    # The recipe: frozen UNet (and VAE) in the weight dtype, trained text encoders in fp32.
    unet.to(device=device, dtype=dtype)
    for encoder in encoders:
        encoder.to(device)
    embeddings = [encoder.get_input_embeddings().weight for encoder in encoders]
    optimizer = torch.optim.AdamW(embeddings, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # "constant"
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    originals = [weight.detach().clone() for weight in embeddings]
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    recorder = StepRecorder(args.warmup, total, device)
    from torch.utils.flop_counter import FlopCounterMode

    flops = FlopCounterMode(display=False)

    for step, batch in enumerate(batches, start=1):
        if step == total + 1:
            flops.__enter__()
        latents = batch.latents.to(device, dtype)
        noise = batch.noise.to(device, dtype)
        timesteps = batch.timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        ids = [i.to(device) for i in batch.ids]
        added = None
        with autocast(device, dtype):  # accelerate autocasts the prepared (trained) text encoder
            if batch.time_ids is not None:  # SDXL: penultimate layers of both, pooled bigG + sizes
                hidden_l = encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
                output_g = encoders[1](ids[1], output_hidden_states=True)
                context = torch.cat([hidden_l, output_g.hidden_states[-2]], dim=-1)
                added = {"text_embeds": output_g.text_embeds.to(dtype), "time_ids": batch.time_ids.to(device, dtype)}
            else:  # SD1: the last layer, after the final layer norm
                context = encoders[0](ids[0])[0]
        prediction = unet(noisy, timesteps, context.to(dtype), added_cond_kwargs=added).sample
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")  # epsilon target
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        # Put back every row but the placeholders' ("index_no_updates").
        with torch.no_grad():
            for weight, original in zip(embeddings, originals):
                keep = torch.ones(weight.shape[0], dtype=torch.bool)
                keep[-args.vectors :] = False
                weight[keep] = original[keep]
        if step <= total:
            recorder.step_done(step, loss.detach().item())
    flops.__exit__(None, None, None)

    del vae
    return {
        **recorder.result(),
        **recorder.memory_result,
        "trained_parameters": sum(weight.numel() for weight in embeddings),
        "flops": float(flops.get_total_flops()),
    }


# --- the parent: run both, print the table --------------------------------------------------------
PASSED_ON = ("device", "dtype", "steps", "warmup", "batch", "vectors", "width", "sdxl_depth", "bigg_layers", "size")


def worker_argv(args: argparse.Namespace, arch: str, impl: str, data: Path) -> list[str]:
    """The command line of one worker: this script with the same settings, one arch and one impl."""
    flags = ("--full", "--tiny", "--compile", "--cuda-graphs")
    return [*child_argv(__file__, args, arch, impl, data, PASSED_ON, flags), "--channels-last", args.channels_last]


def describe_case(arch: str, shapes: Shapes, components: dict[str, int], args: argparse.Namespace) -> str:
    scale = "full size" if args.full else ("tiny" if args.tiny else f"UNet width {shapes.unet.model_channels}")
    parts = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in components.items())
    latent = shapes.size // shapes.vae.downsampling
    return f"{arch.upper()} ({scale}; parameters: {parts}), {shapes.size} px (latent {latent}x{latent})"


def print_case(
    arch: str, shapes: Shapes, results: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[str, float]:
    """Print one architecture's table, ratios and loss check; return the ratios ours/reference."""
    ours, ref = results["ours"], results["reference"]
    print(describe_case(arch, shapes, ours["components"], args))
    columns = ("ms/step", "fastest", "steps/s", "TFLOP/s", "peak growth MiB", "peak total MiB", "trained params")
    widths = (9, 9, 9, 9, 17, 16, 16)
    print("  " + " " * 10 + "".join(f"{c:>{w}s}" for c, w in zip(columns, widths)))
    for impl, r in results.items():
        print(
            f"  {impl:10s}{r['step_s'] * 1000:9.1f}{r['fastest_step_s'] * 1000:9.1f}{1 / r['step_s']:9.2f}"
            f"{r.get('flops', float('nan')) / r['step_s'] / 1e12:9.3f}"
            f"{r['peak_growth_mib']:17.1f}{r['peak_total_mib']:16.1f}{r['trained_parameters']:16,d}"
        )
    ratios = {
        "time": ours["step_s"] / ref["step_s"],
        "fastest step": ours["fastest_step_s"] / ref["fastest_step_s"],
        "peak growth": ours["peak_growth_mib"] / max(ref["peak_growth_mib"], 1e-9),
        "peak total": ours["peak_total_mib"] / ref["peak_total_mib"],
    }
    print("  ratio ours/reference: " + ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))
    first = relative_difference(ours["losses"][0], ref["losses"][0])
    worst = max(relative_difference(a, b) for a, b in zip(ours["losses"], ref["losses"]))
    print(
        f"  step-1 loss: ours {ours['losses'][0]:.6f}, reference {ref['losses'][0]:.6f} "
        f"(relative difference {first:.1e}; largest over all {len(ours['losses'])} steps {worst:.1e})"
    )
    if not first <= (1e-3 if args.dtype == "fp32" else 5e-2):
        print("  WARNING: the step-1 losses differ: the two runs did not compute the same thing")
    return ratios


def add_shape_arguments(parser: argparse.ArgumentParser, *, sdxl: bool = True) -> None:
    """The options of `model_shapes`: --size, --full / --tiny, --width (and --sdxl-depth, --bigg-layers)."""
    big = "512/1024" if sdxl else "512"
    parser.add_argument("--size", type=int, help=f"image side in px (default 256; 64 with --tiny; {big} with --full)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--full", action="store_true", help="full-size SD1.5" + (" and SDXL" if sdxl else "") + " (for a GPU)"
    )
    scale.add_argument("--tiny", action="store_true", help="tiny models throughout: a quick check of the script")
    parser.add_argument("--width", type=int, default=64, help="UNet model_channels of the default shapes (64)")
    if sdxl:
        parser.add_argument("--sdxl-depth", type=int, default=2, help="transformer blocks per SDXL attention level (2)")
        parser.add_argument("--bigg-layers", type=int, help="layers of OpenCLIP bigG in the default shapes (32: all)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="both", choices=[*ARCHS, "both"])
    add_run_arguments(parser, IMPLS)
    parser.add_argument("--vectors", type=int, default=4, help="vectors of the embedding (default 4)")
    parser.add_argument("--images", type=int, default=4, help="images in the synthetic dataset (default 4)")
    add_shape_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="ours with the compiled UNet call (default: eager)")
    parser.add_argument("--cuda-graphs", action="store_true", help="ours with the compiled UNet call and CUDA graphs")
    parser.add_argument(
        "--channels-last", default="auto", choices=["auto", "off", "on"], help="ours' channels_last (auto: CUDA)"
    )
    return finish_run_arguments(parser, parser.parse_args())


def main() -> None:
    args = parse_args()
    if args.impl:  # a worker
        run_worker(args, {"ours": run_ours, "reference": run_reference}, model_shapes(args.arch, args))
        return

    archs = ARCHS if args.arch == "both" else (args.arch,)
    threads = args.threads or torch.get_num_threads()
    print(
        "Textual inversion training steps: ours (lib_training trainer) vs the diffusers recipe "
        "(diffusers UNet2DConditionModel + transformers CLIP), same weights and batches\n"
        f"{args.device} ({threads} threads), {args.dtype}, batch {args.batch}, {args.vectors} vectors, "
        f"AdamW lr {LR}; median of {args.steps} steps after {args.warmup} warm-up steps\n"
    )
    summary = {}
    with tempfile.TemporaryDirectory(prefix="bench-ti-data-") as root:
        for arch in archs:
            shapes = model_shapes(arch, args)
            data = Path(root) / arch
            make_images(data, args.images, shapes.size)
            runs = run_rounds(
                args.rounds,
                IMPLS,
                lambda impl, arch=arch, data=data: worker_argv(args, arch, impl, data),
                lambda impl, result, arch=arch: print(describe_run(arch, impl, result, threads), flush=True),
            )
            summary[arch] = print_case(arch, shapes, fastest(runs), args)
            print()
    for arch, ratios in summary.items():
        missed = [name for name, ratio in ratios.items() if ratio > 1.0 and name != "fastest step"]
        verdict = "meets the target" if not missed else f"misses the target on {', '.join(missed)}"
        print(f"{arch.upper()}: {verdict} (target: ours at least as fast, no more memory)")


if __name__ == "__main__":
    main()
