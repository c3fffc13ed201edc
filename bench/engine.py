"""UNet forward+backward: our LDM-layout UNet against diffusers' UNet2DConditionModel, same weights.

Each implementation runs in its own subprocess so that peak memory is measured cleanly: on the
CPU the growth of the peak resident set during the timed steps (VmHWM, reset before them), on a
GPU torch's peak allocated memory. Prints time per step, peak memory and the ratio ours/diffusers.

    python bench/engine.py                    # SD1.5 structure at width 128, 64x64 latent, CPU
    python bench/engine.py --device cuda --full --dtype fp16   # full-size SD1.5 on a GPU
    python bench/engine.py --device cuda --full --dtype fp16 --compile --cuda-graphs   # + compiled runs

Each run also prints its first step's loss: all runs use the same weights and inputs, so the losses
agree within the precision's tolerance when the compiled forms compute what eager does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from _measure import reset_peak_rss as _reset_peak_rss
from _measure import rss_kib as _rss_kib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from lib_training.model.networks.unet import UNetConfig, UNetModel
    from lib_training.model.tiny import randomize_weights

    torch.manual_seed(0)
    config = UNetConfig.sd15() if args.full else replace(UNetConfig.sd15(), model_channels=args.width)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)

    ours = UNetModel(config)
    randomize_weights(ours, torch.Generator().manual_seed(0))
    if args.impl in ("ours", "compiled", "graphs"):
        model = ours
        forward = lambda x, t, c: model(x, t, c)  # noqa: E731
    else:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (
            convert_ldm_unet_checkpoint,
            create_unet_diffusers_config_from_ldm,
        )

        state = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
        original = {
            "model": {"params": {"unet_config": {"params": config.ldm_params()}}},
        }
        original["model"]["params"]["first_stage_config"] = {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}
        diffusers_config = create_unet_diffusers_config_from_ldm(original, state)
        model = UNet2DConditionModel(**diffusers_config)
        model.load_state_dict(convert_ldm_unet_checkpoint(state, diffusers_config), strict=True)
        del ours
        forward = lambda x, t, c: model(x, t, encoder_hidden_states=c).sample  # noqa: E731

    model.to(device=device, dtype=dtype).train()
    side = args.latent
    inputs = torch.Generator().manual_seed(1)  # the same inputs for every implementation
    x = torch.randn(args.batch, 4, side, side, generator=inputs).to(device=device, dtype=dtype)
    c = torch.randn(args.batch, 77, config.context_dim, generator=inputs).to(device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=inputs).to(device)
    compile_message = ""
    if args.impl != "diffusers":
        from lib_training.model.memory_format import channels_last, to_channels_last, use_channels_last

        if use_channels_last(args.channels_last, device):
            channels_last([model]).__enter__()  # for the whole process
            x = to_channels_last(x)
        eager_forward = forward
        compiled = None
        if args.impl == "compiled":
            from lib_training.training.compiled import CompiledUNet

            say = lambda message: print(message, file=sys.stderr)  # noqa: E731
            compiled = CompiledUNet(model, on_fallback=say, backend=args.backend)
        if args.impl == "graphs":
            from lib_training.training.compiled import CompiledUNet, compile_plan

            plan = compile_plan("cuda-graphs", device)
            compile_message = plan.note
            if plan.mode is not None:
                compiled = CompiledUNet(model, on_fallback=lambda m: None, backend=args.backend, mode=plan.mode)
        if compiled is not None:
            forward = lambda x, t, c: compiled(x, t, c)  # noqa: E731

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = forward(x, t, c).float().pow(2).mean()
        loss.backward()
        return loss

    if args.count_ops:
        step()
        return count_ops(step)

    def saved_for_backward() -> float:
        # CUDA graphs keep their activations in their own pool: count the eager forward's instead.
        run = eager_forward if args.impl == "graphs" else forward
        return saved_for_backward_bytes(lambda: run(x, t, c)) / 2**20

    first_loss = float(step())
    for _ in range(args.warmup - 1):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        model.zero_grad(set_to_none=True)
        _reset_peak_rss()
        base = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    if args.impl in ("compiled", "graphs") and compiled is not None and compiled.fallback:
        compile_message = compiled.fallback
    flop_step = step
    if args.impl == "graphs":  # the same FLOPs, counted without replaying graphs under a dispatch mode

        def flop_step() -> None:
            model.zero_grad(set_to_none=True)
            eager_forward(x, t, c).float().pow(2).mean().backward()

    return {
        "step_s": statistics.median(times),
        "peak_mb": (peak - base) / 2**20,
        "saved_mb": saved_for_backward(),
        "flops": step_flops(flop_step),
        "loss": first_loss,
        "note": compile_message,
    }


def step_flops(step) -> float:
    """FLOPs of one training step (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def count_ops(step) -> dict[str, float]:
    """aten operators one `step()` executes: all (nested included) and top-level ones."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops, top = aten_ops(prof.events())
    return {"ops": len(ops), "top_ops": len(top)}


def aten_ops(events) -> tuple[list, list]:
    """A profiler's aten operator events: all (nested included), and the top-level ones (not called by
    another aten operator)."""
    ops = [e for e in events if e.name.startswith("aten::")]
    return ops, [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]


def saved_for_backward_bytes(run) -> int:
    """Bytes of distinct tensors autograd keeps for the backward pass of `run()` (activation memory)."""
    import torch

    seen: dict[tuple[int, int], int] = {}

    def pack(tensor):
        if tensor.numel() and not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 (model_channels 320)")
    parser.add_argument("--width", type=int, default=128, help="model_channels when not --full (default 128)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (default 32 = 256 px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time ours through torch.compile")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="also time ours compiled with CUDA graphs (compile cuda-graphs)"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of --compile (inductor)")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "off", "on"], help="ours (auto: CUDA)")
    parser.add_argument("--count-ops", action="store_true", help="count aten operators per step instead of timing")
    parser.add_argument("--impl", choices=["ours", "compiled", "graphs", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return

    results = {}
    impls = ["ours"]
    if not args.count_ops:
        impls += ["compiled"] * args.compile + ["graphs"] * args.cuda_graphs
    impls.append("diffusers")
    for impl in impls:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
        # Large allocations through mmap, so that freed memory leaves the resident set at once.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    shape = "SD1.5 full size" if args.full else f"SD1.5 structure, width {args.width}"
    if args.count_ops:
        what = f"{shape}, batch {args.batch}, latent {args.latent}x{args.latent}, {args.dtype}"
        print(f"aten operators per UNet forward+backward (CPU profiler), {what}")
        ours, ref = results["ours"], results["diffusers"]
        for kind, key in (("all (nested included)", "ops"), ("top-level", "top_ops")):
            print(
                f"  {kind:22s} ours {ours[key]:7d}   diffusers {ref[key]:7d}   "
                f"ratio ours/diffusers {ours[key] / ref[key]:.3f}"
            )
        return
    print(
        f"UNet forward+backward, {shape}, batch {args.batch}, latent {args.latent}x{args.latent}, "
        f"{args.dtype} on {args.device}, median of {args.iters}"
    )
    for impl, r in results.items():
        print(
            f"  {impl:9s} {r['step_s'] * 1000:9.1f} ms/step   peak +{r['peak_mb']:8.1f} MiB   "
            f"saved for backward {r['saved_mb']:8.1f} MiB   {r['flops'] / r['step_s'] / 1e12:7.3f} TFLOP/s   "
            f"loss {r['loss']:.6g}"
        )
        if r.get("note"):
            print(f"            ({r['note']})")
    ref = results["diffusers"]
    for impl in results:
        if impl == "diffusers":
            continue
        ours = results[impl]
        print(
            f"  ratio {impl}/diffusers: time {ours['step_s'] / ref['step_s']:.3f}, "
            f"peak memory {ours['peak_mb'] / max(ref['peak_mb'], 1e-9):.3f}, "
            f"saved for backward {ours['saved_mb'] / ref['saved_mb']:.3f}"
        )


if __name__ == "__main__":
    main()
