"""Command-line interface. Each subcommand parses its options and calls the library; user errors
(`lib_training.errors.UserError`) are printed as one message and exit with status 2."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lib_training.aesthetic.cli import add_aesthetic_parsers, add_generate_arguments, applied_from_args
from lib_training.app.hypernetwork_cli import add_hypernetwork_parser
from lib_training.app.ui.serve import add_serve_parser
from lib_training.errors import CheckpointError, ConfigError, UserError
from lib_training.merge.cli import add_merge_parsers
from lib_training.options import SettingsError
from lib_training.world.cli import add_world_parsers


def _cmd_make_tiny(args: argparse.Namespace) -> None:
    from lib_training.model.tiny import make_tiny

    model = make_tiny(args.arch, args.seed)
    model.save(args.out)
    params = sum(p.numel() for m in model.modules.values() for p in m.parameters())
    print(f"wrote {args.out}: tiny random {args.arch} checkpoint, {params:,} parameters, seed {args.seed}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from lib_training.devices import pick_device, pick_dtype
    from lib_training.model.sampler import SampleSettings, generate
    from lib_training.model.standalone import load_model

    device = pick_device(args.device)
    model = load_model(args.ckpt, device=device, dtype=pick_dtype(args.dtype, device))
    side = model.family.default_size
    settings = SampleSettings(
        prompt=args.prompt,
        negative_prompt=args.negative,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg,
        width=args.width or side,
        height=args.height or side,
        sampler=args.sampler,
    )
    start = time.perf_counter()
    with applied_from_args(model, args) as extra, tqdm(total=settings.steps, desc="sampling", unit="step") as bar:
        image = generate(model, settings, on_step=lambda done, total: bar.update(1))
    from lib_training.aesthetic.personalise import format_parameters
    from lib_training.training.outputs import RunFolder

    parameters = (
        f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\nSteps: {settings.steps}, "
        f"Sampler: {settings.sampler}, CFG scale: {settings.cfg_scale}, Seed: {settings.seed}, "
        f"Size: {settings.width}x{settings.height}"
    )
    parameters += ", " + format_parameters(extra) if extra else ""
    RunFolder.save_png(args.out, image, {"parameters": parameters})
    print(
        f"wrote {args.out} ({image.width}x{image.height}, {model.family.describe()}, "
        f"{time.perf_counter() - start:.1f} s)"
    )


def _add_train_parsers(commands: argparse._SubParsersAction) -> None:
    """`train <kind>` for every registered method, its options generated from the method's settings."""
    from lib_training.methods import registered
    from lib_training.options import add_arguments
    from lib_training.training.request import GROUPS, group_settings

    specs = registered()
    train = commands.add_parser(
        "train",
        help="train a result: " + ", ".join(specs),
        description="Train on a checkpoint file. Methods:\n"
        + "\n".join(f"  {kind:<14} {spec.summary}" for kind, spec in specs.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    methods = train.add_subparsers(dest="method", required=True, metavar="METHOD")
    titles = {"method": None, "data": "dataset", "loop": "training"}
    for kind, spec in specs.items():
        sub = methods.add_parser(
            kind, help=spec.summary, description=f"{spec.title}: {spec.summary}. Writes OUT/NAME and a run log in OUT."
        )
        run = sub.add_argument_group("model and output")
        run.add_argument("--ckpt", type=Path, required=True, help="checkpoint to train on (.safetensors or .ckpt)")
        run.add_argument("--out", type=Path, required=True, help="output folder")
        run.add_argument("--resume", action="store_true", help="continue the run saved in the output folder")
        run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        run.add_argument("--dtype", default="auto", help="weights' dtype: auto, fp32, fp16 or bf16 (default auto)")
        for group in GROUPS:
            cls, defaults = group_settings(spec, group)
            add_arguments(sub.add_argument_group(titles[group] or spec.title.lower()), cls, defaults=defaults)
        sub.set_defaults(run=_cmd_train, kind=kind)


def _cmd_train(args: argparse.Namespace) -> None:
    from lib_training.methods import spec_for
    from lib_training.options import namespace_values
    from lib_training.training.outputs import RunFolder
    from lib_training.training.request import GROUPS, group_settings, parse_request

    spec = spec_for(args.kind)
    body = {group: namespace_values(group_settings(spec, group)[0], args) for group in GROUPS}
    request = parse_request(spec, {**body, "resume": args.resume})  # every bad option at once, before any work
    method = request.build()
    problem = RunFolder(args.out, method.name, method.suffix).start_problem(request.overwrite, request.resume)
    if problem:
        raise ConfigError(problem)
    if not Path(args.ckpt).is_file():
        raise CheckpointError(
            f"the checkpoint {args.ckpt} does not exist. Give the path of a .safetensors or .ckpt file."
        )

    # Only now what training needs: a bad option above is refused without these imports.
    from tqdm import tqdm

    from lib_training.devices import pick_device, pick_dtype
    from lib_training.model.standalone import load_model
    from lib_training.training.run import prepare_dataset, train

    dataset = prepare_dataset(method, request.data, request.loop)
    print(dataset.summary(batch_size=request.loop.batch_size))
    device = pick_device(args.device)
    model = load_model(args.ckpt, device=device, dtype=pick_dtype(args.dtype, device))
    print(f"model: {args.ckpt} ({model.family.describe()}) on {device}")

    bar = tqdm(total=request.loop.steps, unit="step", dynamic_ncols=True)

    def on_progress(progress) -> None:
        bar.set_description(progress.phase, refresh=False)
        if progress.phase == "training":
            bar.total = progress.total
            bar.n = progress.step
            bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.lr:.2g}")
        bar.refresh()

    try:
        result = train(
            model, method, dataset, request.loop, args.out, overwrite=request.overwrite, resume=request.resume,
            model_title=str(args.ckpt), on_progress=on_progress,
        )  # fmt: skip
    finally:
        bar.close()
    if result.resumed_from is not None:
        print(f"resumed the run at step {result.resumed_from} (same optimizer state, data order and random numbers)")
    state = "interrupted" if result.interrupted else "finished"
    print(f"{state} after {result.step} steps; wrote {result.result}")


def build_parser() -> argparse.ArgumentParser:
    installed = Path(sys.argv[0]).name.startswith("sd-webui-training")  # the console command, not `-m`
    parser = argparse.ArgumentParser(
        prog="sd-webui-training" if installed else "python -m lib_training", description=__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser(
        "make-tiny",
        help="write a tiny random checkpoint with the real structure of a family",
        description="Write a small random checkpoint with the real block structure and key names of a "
        "family (for demos and tests; it generates noise-like images).",
    )
    tiny.add_argument("--arch", choices=["sd1", "sd2", "sd2-v", "sdxl"], required=True, help="model family")
    tiny.add_argument("out", type=Path, help="output .safetensors file")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(run=_cmd_make_tiny)

    gen = commands.add_parser(
        "generate",
        help="generate one image from a checkpoint",
        description="Generate one image with the preview sampler.",
    )
    gen.add_argument("--ckpt", type=Path, required=True, help="checkpoint (.safetensors or .ckpt)")
    gen.add_argument("--prompt", required=True, help="the prompt")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--out", type=Path, required=True, help="output PNG file")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gen.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    gen.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    gen.add_argument("--width", type=int, default=None, help="width in pixels (default: the family's size)")
    gen.add_argument("--height", type=int, default=None, help="height in pixels (default: the family's size)")
    gen.add_argument("--sampler", choices=["euler", "ddim"], default="euler", help="sampler (default euler)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    gen.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16 (default auto)")
    add_generate_arguments(gen)
    gen.set_defaults(run=_cmd_generate)

    _add_train_parsers(commands)
    add_hypernetwork_parser(commands)
    add_aesthetic_parsers(commands)
    add_merge_parsers(commands)
    add_serve_parser(commands)
    add_world_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SettingsError as error:
        print(f"error: invalid settings:\n{settings_lines(error, getattr(args, 'kind', None))}", file=sys.stderr)
        return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def settings_lines(error: SettingsError, kind: str | None) -> str:
    """One line per bad setting, named by its command-line flag ("  --lr: ..."), or its dotted name."""
    flags: dict[str, str] = {}
    if kind is not None:
        from lib_training.methods import spec_for
        from lib_training.options import describe
        from lib_training.training.request import GROUPS, group_settings

        spec = spec_for(kind)
        for group in GROUPS:
            flags.update({f"{group}.{info.name}": info.flag for info in describe(*group_settings(spec, group))})
        flags["resume"] = "--resume"
    return "\n".join(f"  {flags.get(name, name) or 'settings'}: {problem}" for name, problem in error.errors.items())
