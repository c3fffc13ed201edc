"""A plain LoRA inside its layer's autograd node (`model.networks.fused`) against the same LoRA through its
module forward (the path every layer took before), in one process on one model, alternating A/B.

Builds bench/train_lora.py's model (SD1 or SDXL structure at width 64, 256 px; --full for the real sizes),
attaches a LoRA with kohya's default modules (rank 16, alpha 8, up weights non-zero) and times a UNet
forward+backward with the fused node ("fused") and with the LoRA's marks taken off ("module"), alternately,
so that changing machine load hits both alike. Prints the median CPU time (one thread: the CPU time is
steadier than wall time on a shared machine) or, on a GPU, the synchronized wall time, and the aten
operators of one forward+backward each way (CPU profiler), with the ratios fused/module.

    python bench/lora_node.py --threads 1 [--arch sdxl] [--rounds 7] [--dtype bf16]
    python bench/lora_node.py --device cuda --full
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timing
import train_embedding as shared
from engine import count_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd1", choices=shared.ARCHS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(timing.DTYPES), help="default: fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each kind (default 5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=8.0)
    shared.add_shape_arguments(parser)
    args = parser.parse_args()
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.threads:
        torch.set_num_threads(args.threads)

    from lib_training.methods.lora import LoraConfig, LoraMethod
    from lib_training.model.networks.fused import LOW_RANK

    device, dtype = torch.device(args.device), timing.DTYPES[args.dtype]
    shapes = shared.model_shapes(args.arch, args)
    model = shared.build_model(shapes, device, dtype)
    method = LoraMethod(LoraConfig(name="zqx", rank=args.rank, alpha=args.alpha))
    method.attach(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in method.network.lora.values():
            module.up.copy_(torch.randn(module.up.shape, generator=generator) * 0.01)
    side = shapes.size // 8
    x_t = torch.randn(1, 4, side, side, generator=generator).to(device)
    with torch.no_grad(), shared.autocast(device, dtype):
        cond = model.encode_prompts(["a photo of zqx"])
    marks = {}
    for target in method.network.targets.values():
        forward = target.layer.__dict__.get("forward")
        if forward is not None and hasattr(forward, LOW_RANK):
            marks[forward] = getattr(forward, LOW_RANK)

    def use(fused: bool) -> None:
        for forward, term in marks.items():
            if fused:
                setattr(forward, LOW_RANK, term)
            elif hasattr(forward, LOW_RANK):
                delattr(forward, LOW_RANK)

    def step() -> None:
        method.network.zero_grad(set_to_none=True)
        with shared.autocast(device, dtype):
            loss = model.predict(x_t, torch.tensor([500], device=device), cond).float().square().mean()
        loss.backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {"fused": [], "module": []}
    ops = {}
    for kind in times:  # warm-up and operator counts
        use(kind == "fused")
        step()
        ops[kind] = count_ops(step)
    for _ in range(args.rounds):
        for kind in times:
            use(kind == "fused")
            sync()
            start = clock()
            step()
            sync()
            times[kind].append(clock() - start)
    use(True)
    method.detach()
    what = "wall time (synchronized)" if device.type == "cuda" else "CPU time"
    print(
        f"LoRA UNet forward+backward, {args.arch} (width {shapes.unet.model_channels}, {shapes.size} px), "
        f"{args.device} {args.dtype}, {len(marks)} fused of {len(method.network.lora)} modules, rank {args.rank}; "
        f"median {what} of {args.rounds} alternating steps each"
    )
    median = {kind: statistics.median(found) * 1000 for kind, found in times.items()}
    for kind in times:
        print(
            f"  {kind:7s} {median[kind]:9.1f} ms   aten operators {ops[kind]['ops']:7d} "
            f"(top-level {ops[kind]['top_ops']:6d})"
        )
    print(
        f"  ratio fused/module: time {median['fused'] / median['module']:.3f}, "
        f"operators {ops['fused']['ops'] / ops['module']['ops']:.3f} "
        f"(top-level {ops['fused']['top_ops'] / ops['module']['top_ops']:.3f})"
    )


if __name__ == "__main__":
    main()
