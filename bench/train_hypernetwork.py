"""Hypernetwork training steps: ours against a loop written the way A1111's trainer works, and the
time a hypernetwork adds to generating an image.

Ours is the real training path, `lib_training.training.run.train` with a `HypernetworkMethod` over a
synthetic image folder; its time per step comes from the progress callback, after warm-up steps.
The reference is A1111's hypernetwork trainer, written plainly on the same model: A1111 undoes its
attention optimizations while it trains a hypernetwork, so every attention layer runs A1111's plain
forward (q from x; the context through the (k, v) modules of its width; k, v; einsum scores,
softmax, einsum), the conditioning of each image is computed once beforehand (A1111's dataset does
so unless tags are shuffled or dropped), and each step is the UNet's forward, an MSE loss against
epsilon, backward and torch's AdamW with its default weight decay (0.01, which ours is given too).
Both start from the same weights (hypernetwork included) and see the same latents, prompts, noise
and timesteps; the losses of the first step show that they compute the same thing.

Generation: one image with the preview sampler, without and with a hypernetwork applied at strength
1 (`apply_for_generation`); the median of a few repeats, and the added time per image in percent.

Each case runs in its own subprocess (peak memory as in bench/train_embedding.py). Time per step is
the median over the timed steps, as wall time and as the process's CPU time (bench/timing.py). With
--threads 1 on the CPU the comparison and the verdict use the CPU time: a one-thread step's CPU time
is its wall time on an idle machine, while its wall time on a shared machine also counts the time
it waited for a CPU (several times the step itself on a busy 2-core machine). With --rounds N, ours
and the reference run N times each, taking turns to go first (ours, reference, reference, ours, ...);
each side's quietest round is compared, and the spread over the rounds is printed with ours' slowest
round against the reference's quietest. Generation alternates plain and applied images in one
process and compares each way's quietest image (wall and CPU time each; the CPU time's medians
too). Targets: ours at least 1.3x the reference's steps/s at no more peak memory; generation slower
by under 5%.

    python bench/train_hypernetwork.py                       # SD1 shapes on the CPU (UNet width 64)
    python bench/train_hypernetwork.py --tiny --steps 2 --warmup 1   # a quick check of the script
    python bench/train_hypernetwork.py --activation relu     # a nonlinear module (default: linear, A1111's)
    python bench/train_hypernetwork.py --device cuda --full  # full-size SD1.5, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from timing import (
    DTYPES,
    StepRecorder,
    Stopwatch,
    add_run_arguments,
    child_argv,
    describe_run,
    finish_run_arguments,
    relative_difference,
    run_child,
    run_rounds,
    run_worker,
)
from torch import nn
from train_embedding import (
    SEED,
    Shapes,
    add_shape_arguments,
    autocast,
    build_model,
    make_images,
    model_shapes,
    parameter_count,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAME = "hn"
LR = 5e-6  # our default, and where A1111's users settle
WEIGHT_DECAY = 0.01  # torch AdamW's default, which A1111's trainer uses
TEMPLATE = "filewords"
LAYER_STRUCTURE = "1, 2, 1"
ACTIVATION = "linear"  # the default of --activation: the method's (and A1111's) default
IMPLS = ("ours", "reference", "generate")


def settings(args: argparse.Namespace):
    from lib_training.methods.hypernetwork import HypernetworkConfig

    return HypernetworkConfig(
        name=NAME, widths=args.widths, layer_structure=LAYER_STRUCTURE, activation=args.activation
    )


# --- ours ---------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, shapes: Shapes) -> dict[str, Any]:
    from lib_training.dataset import DatasetConfig
    from lib_training.methods.hypernetwork import HypernetworkMethod
    from lib_training.training.config import LoopConfig
    from lib_training.training.run import train

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    total = args.warmup + args.steps
    model = build_model(shapes, device, dtype)
    method = HypernetworkMethod(settings(args))
    loop = LoopConfig(steps=total, batch_size=args.batch, lr=str(LR), weight_decay=WEIGHT_DECAY, precision=args.dtype,
                      seed=SEED, save_every=0, preview_every=0, latent_sampling="mean")  # fmt: skip
    recorder = StepRecorder(args.warmup, total, device)

    def on_progress(progress) -> None:
        if progress.phase == "training":
            recorder.step_done(progress.step, progress.loss)

    with tempfile.TemporaryDirectory(prefix="bench-hn-out-") as out:
        data = DatasetConfig(path=args.data, size=shapes.size, template=TEMPLATE)
        train(model, method, data, loop, out, on_progress=on_progress)
    return {
        **recorder.result(),
        **recorder.memory_result,
        "trained_parameters": sum(p.numel() for p in method.parameters()),
        "components": {name: parameter_count(module) for name, module in model.modules.items()},
    }


# --- the reference: A1111's trainer -------------------------------------------------------------
class A1111Module(nn.Module):
    """A1111's HypernetworkModule in training: x + linear(x)."""

    def __init__(self, linear: nn.Sequential) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def a1111_attention(layer: nn.Module, modules: dict[int, tuple[nn.Module, nn.Module]]):
    """A1111's plain CrossAttention forward with hypernetworks, for one of our attention layers."""

    def forward(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = layer.heads
        q = layer.to_q(x)
        context = x if context is None else context
        pair = modules.get(context.shape[2])
        context_k, context_v = context, context
        if pair is not None:  # A1111 runs the modules in fp32 and casts back to the UNet's dtype
            context_k = pair[0](context.float()).to(context.dtype)
            context_v = pair[1](context.float()).to(context.dtype)
        k, v = layer.to_k(context_k), layer.to_v(context_v)
        q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=h) for t in (q, k, v))
        scale = q.shape[-1] ** -0.5
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * scale
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        return layer.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=h))

    return forward


def reference_batches(model, args: argparse.Namespace, shapes: Shapes, total: int) -> list[dict[str, Any]]:
    """The batches of ours for steps 1..total (same dataset seed, latents, noise and timesteps), with the
    conditioning computed once per prompt beforehand, as A1111's dataset does."""
    from lib_training.dataset import DatasetConfig, TrainingDataset
    from lib_training.model.diffusion import SizeConditioning
    from lib_training.seeding import derive_seed

    dataset = TrainingDataset(DatasetConfig(path=args.data, size=shapes.size, template=TEMPLATE, seed=SEED), NAME)
    sampler = dataset.sampler(args.batch)
    means: dict[Any, torch.Tensor] = {}
    conds: dict[Any, Any] = {}
    batches = []
    for step in range(total):
        plan = next(sampler)
        batch = dataset.batch(plan, load_images=False)
        with torch.no_grad():
            for view in batch.views:
                if view not in means:
                    means[view] = model.encode_latent_distribution(dataset.load_image(view)[None]).mean[0].cpu()
            sizes = None
            if model.family.is_sdxl:
                sizes = [SizeConditioning(o, c, batch.target_size) for o, c in zip(batch.original_sizes, batch.crops)]
            key = (tuple(batch.prompts), None if sizes is None else tuple(sizes))
            if key not in conds:
                with autocast(model.device, DTYPES[args.dtype]):
                    conds[key] = model.encode_prompts(batch.prompts, None, sizes)
        latents = torch.stack([means[view] for view in batch.views]) * model.family.latent_scale
        generator = torch.Generator().manual_seed(derive_seed(SEED, "noise", step, plan.epoch, plan.position))
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, model.schedule.num_steps, (latents.shape[0],), generator=generator)
        batches.append({"latents": latents, "noise": noise, "timesteps": timesteps, "cond": conds[key]})
    return batches


def run_reference(args: argparse.Namespace, shapes: Shapes) -> dict[str, Any]:
    from lib_training.methods.hypernetwork import HypernetworkMethod
    from lib_training.methods.hypernetwork_attach import find_kv_sites

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    total = args.warmup + args.steps
    model = build_model(shapes, device, dtype)
    batches = reference_batches(model, args, shapes, total)
    ours = HypernetworkMethod(settings(args))
    with ours.attached(model):  # the same initial weights as ours
        modules = {
            w: (A1111Module(k.linear), A1111Module(v.linear)) for w, (k, v) in ours.modules.items()
        }  # fmt: skip
    weights = [p for pair in modules.values() for m in pair for p in m.parameters()]
    for pair in modules.values():
        for m in pair:
            m.train().requires_grad_(True)
    layers = {id(site.to_k): site for site in find_kv_sites(model)}
    attention = [m for m in model.unet_module.modules() if id(getattr(m, "to_k", None)) in layers]
    for layer in attention:
        layer.forward = a1111_attention(layer, modules)
    optimizer = torch.optim.AdamW(weights, lr=LR, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    recorder = StepRecorder(args.warmup, total, device)
    schedule = model.schedule
    for step, batch in enumerate(batches, start=1):
        latents, noise, t = batch["latents"].to(device), batch["noise"].to(device), batch["timesteps"].to(device)
        x_t = schedule.add_noise(latents, noise, t)
        with autocast(device, dtype):
            pred = model.predict(x_t.to(model.dtype), t, batch["cond"])
        loss = nn.functional.mse_loss(pred.float(), schedule.target(latents, noise, t).float())
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recorder.step_done(step, loss.item())
    return {**recorder.result(), **recorder.memory_result, "trained_parameters": sum(p.numel() for p in weights)}


# --- generation ----------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace, shapes: Shapes) -> dict[str, Any]:
    from lib_training.methods.hypernetwork import HypernetworkMethod
    from lib_training.model.sampler import SampleSettings, generate

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build_model(shapes, device, dtype)
    method = HypernetworkMethod(settings(args))
    with tempfile.TemporaryDirectory(prefix="bench-hn-gen-") as out:
        with method.attached(model):
            method.save(Path(out) / "hn.pt", 0, {})
        loaded = HypernetworkMethod.load(Path(out) / "hn.pt", model)
    sample = SampleSettings(prompt="a photo of a red ball", seed=1, steps=args.gen_steps, width=shapes.size,
                            height=shapes.size)  # fmt: skip

    def once(applied: bool) -> Stopwatch:
        with Stopwatch(device) as watch, torch.no_grad(), autocast(device, dtype):
            if applied:
                with loaded.apply_for_generation(model, 1.0):
                    generate(model, sample)
            else:
                generate(model, sample)
        return watch

    once(False), once(True)  # warm-up
    plain, applied = [], []
    for _ in range(args.gen_repeats):  # interleaved, so that drifting machine load hits both alike
        plain.append(once(False))
        applied.append(once(True))
    # Other work only ever adds time: each way's quietest image (min) is the steadiest estimate.
    return {
        "plain_s": min(w.wall for w in plain),
        "applied_s": min(w.wall for w in applied),
        "plain_cpu_s": min(w.cpu for w in plain),
        "applied_cpu_s": min(w.cpu for w in applied),
        "median_added_cpu": statistics.median(w.cpu for w in applied) / statistics.median(w.cpu for w in plain) - 1,
    }


# --- the parent ------------------------------------------------------------------------------------
PASSED_ON = (
    *("device", "dtype", "steps", "warmup", "batch", "width", "size"),
    *("gen_steps", "gen_repeats", "widths", "activation"),
)


def by_cpu_time(args: argparse.Namespace) -> bool:
    """Whether CPU time is the measure: one thread on the CPU, where it is the idle machine's wall time."""
    return args.device == "cpu" and args.threads == 1


def side(runs: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    """(quietest, slowest, median) of the runs' median step times under `key`."""
    values = [r[key] for r in runs]
    return min(values), max(values), statistics.median(values)


def print_case(
    arch: str, shapes: Shapes, runs: dict[str, list[dict[str, Any]]], gen: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    ours, ref = (min(runs[impl], key=lambda r: r["step_s"]) for impl in ("ours", "reference"))
    scale = "full size" if args.full else ("tiny" if args.tiny else f"UNet width {shapes.unet.model_channels}")
    print(f"{arch.upper()} ({scale}), {shapes.size} px, hypernetwork {LAYER_STRUCTURE} {args.activation} on widths "
          f"{args.widths}, "
          f"{ours['trained_parameters']:,} trained parameters (reference {ref['trained_parameters']:,})")  # fmt: skip
    rounds = len(runs["ours"])
    cpu = {impl: side(runs[impl], "cpu_step_s") for impl in runs}
    wall = {impl: side(runs[impl], "step_s") for impl in runs}
    print(f"  {'':10s}{'ms/step':>9s}{'CPU ms/step':>13s}{'steps/s':>9s}{'peak growth MiB':>17s}{'peak total MiB':>16s}"
          f"   CPU ms/step over {rounds} round(s)")  # fmt: skip
    for impl, r in (("ours", ours), ("reference", ref)):  # each time the quietest round's
        low, high, _ = cpu[impl]
        print(f"  {impl:10s}{wall[impl][0] * 1000:9.1f}{low * 1000:13.1f}{1 / wall[impl][0]:9.2f}"
              f"{r['peak_growth_mib']:17.1f}{r['peak_total_mib']:16.1f}"
              f"   {low * 1000:.0f}-{high * 1000:.0f}")  # fmt: skip
    cpu_speed = cpu["reference"][0] / cpu["ours"][0]
    wall_speed = wall["reference"][0] / wall["ours"][0]
    worst = cpu["reference"][0] / cpu["ours"][1]  # ours' slowest round against the reference's quietest
    speed = cpu_speed if by_cpu_time(args) else wall_speed
    basis = "CPU time (one thread)" if by_cpu_time(args) else "wall time"
    print(f"  speed ours/reference by {basis}: {speed:.2f}x (target >= 1.3); CPU time {cpu_speed:.2f}x (ours' "
          f"slowest round {worst:.2f}x), wall time {wall_speed:.2f}x (quietest rounds)")  # fmt: skip
    memory = ours["peak_growth_mib"] / max(ref["peak_growth_mib"], 1e-9)
    print(f"  peak growth ours/reference: {memory:.2f} (target <= 1); peak total "
          f"{ours['peak_total_mib'] / ref['peak_total_mib']:.2f}")  # fmt: skip
    first = relative_difference(ours["losses"][0], ref["losses"][0])
    print(f"  step-1 loss: ours {ours['losses'][0]:.6f}, reference {ref['losses'][0]:.6f} (relative difference "
          f"{first:.1e})")  # fmt: skip
    added_wall = gen["applied_s"] / gen["plain_s"] - 1
    added_cpu = gen["applied_cpu_s"] / gen["plain_cpu_s"] - 1
    added = added_cpu if by_cpu_time(args) else added_wall
    print(f"  generation ({args.gen_steps} steps, quietest of {args.gen_repeats} images each way): "
          f"{gen['plain_cpu_s'] * 1000:.0f} ms plain, {gen['applied_cpu_s'] * 1000:.0f} ms with the hypernetwork "
          f"(CPU time): {added_cpu:+.1%} per image (medians {gen['median_added_cpu']:+.1%}); wall time "
          f"{gen['plain_s'] * 1000:.0f} / {gen['applied_s'] * 1000:.0f} ms: {added_wall:+.1%}; "
          f"by {basis}: {added:+.1%} (target < 5%)")  # fmt: skip
    missed = [name for name, bad in (("speed", speed < 1.3), ("memory", memory > 1), ("generation", added >= 0.05))
              if bad]  # fmt: skip
    return missed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    add_run_arguments(parser, IMPLS)
    parser.add_argument("--images", type=int, default=4, help="images in the synthetic dataset (default 4)")
    add_shape_arguments(parser, sdxl=False)
    parser.add_argument(
        "--widths", default="auto", help="widths with modules: auto (context and features) or a list, e.g. 768"
    )
    parser.add_argument(
        "--activation",
        default=ACTIVATION,
        help=f"the modules' activation (default {ACTIVATION}, A1111's, one matrix at generation; e.g. relu)",
    )
    parser.add_argument("--gen-steps", type=int, default=10, help="sampling steps per generated image (10)")
    parser.add_argument("--gen-repeats", type=int, default=5, help="images timed each way (5)")
    args = finish_run_arguments(parser, parser.parse_args())
    args.sdxl_depth, args.bigg_layers = 2, None  # what train_embedding's shapes read
    return args


def main() -> None:
    args = parse_args()
    shapes = model_shapes(args.arch, args)
    if args.impl:  # a worker
        run_worker(args, {"ours": run_ours, "reference": run_reference, "generate": run_generate}, shapes)
        return
    threads = args.threads or torch.get_num_threads()
    print(
        "Hypernetwork training steps: ours (lib_training trainer) vs A1111's trainer (plain attention, "
        f"precomputed conditioning), same weights and batches\n{args.device} ({threads} threads), {args.dtype}, "
        f"batch {args.batch}, AdamW lr {LR}; median of {args.steps} steps after {args.warmup} warm-up steps; "
        f"{args.rounds} round(s), ours and the reference taking turns to go first\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench-hn-data-") as root:
        data = Path(root) / args.arch
        make_images(data, args.images, shapes.size)
        flags = ("--full", "--tiny")
        runs = run_rounds(
            args.rounds,
            ("ours", "reference"),
            lambda impl: child_argv(__file__, args, args.arch, impl, data, PASSED_ON, flags),
            lambda impl, result: print(
                describe_run(args.arch, impl, result, threads)[:-1] + f"; CPU {result['cpu_step_s'] * 1000:.1f} ms)",
                flush=True,
            ),
            alternate=True,
        )
        gen = run_child(child_argv(__file__, args, args.arch, "generate", data, PASSED_ON, flags))
        missed = print_case(args.arch, shapes, runs, gen, args)
    verdict = "meets the targets" if not missed else f"misses the target on {', '.join(missed)}"
    print(f"{args.arch.upper()}: {verdict}")


if __name__ == "__main__":
    main()
