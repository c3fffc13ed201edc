"""Command line: `aesthetic create`, and the `--aesthetic...` options of `generate`."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib_training.aesthetic.clip_model import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipSource
from lib_training.aesthetic.embedding_file import load_embedding
from lib_training.aesthetic.personalise import AestheticSettings, Personaliser, aesthetic_applied
from lib_training.model.diffusion import DiffusionModel

_DEFAULTS = AestheticSettings()


def _add_clip_arguments(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument(
        "--clip-model",
        default=DEFAULT_MODEL,
        help=f"open_clip architecture of the CLIP model (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--clip-weights",
        type=Path,
        default=None,
        help="local weights of that CLIP model in open_clip's layout (.safetensors, or a pickle read with "
        f"weights_only); default: download the {DEFAULT_PRETRAINED!r} weights through open_clip",
    )
    parser.add_argument(
        "--clip-pretrained",
        default=DEFAULT_PRETRAINED,
        help=f"open_clip's tag of the weights (default {DEFAULT_PRETRAINED}; says whether they use QuickGELU)",
    )


def clip_source(args: argparse.Namespace) -> ClipSource:
    return ClipSource(args.clip_model, args.clip_pretrained, args.clip_weights)


def add_aesthetic_parsers(commands: argparse._SubParsersAction) -> None:
    """`aesthetic create`: make an aesthetic embedding from a folder of images."""
    aesthetic = commands.add_parser(
        "aesthetic",
        help="aesthetic gradients: make an aesthetic embedding (apply one with generate --aesthetic)",
        description="Aesthetic gradients (the aesthetic-gradients extension's embeddings, on every family).",
    )
    tools = aesthetic.add_subparsers(dest="tool", required=True, metavar="TOOL")
    create = tools.add_parser(
        "create",
        help="the mean CLIP image feature of a folder of images, as OUT/NAME.pt",
        description="Write OUT/NAME.pt: the mean CLIP image feature [1, D] of the images in DATA (the file the "
        "aesthetic-gradients extension reads from its aesthetic_embeddings folder).",
    )
    create.add_argument("--data", type=Path, required=True, help="folder of images (searched recursively)")
    create.add_argument("--name", required=True, help="name of the embedding (the file name without .pt)")
    create.add_argument("--out", type=Path, required=True, help="output folder")
    create.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    create.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    create.add_argument("--overwrite", action="store_true", help="replace an existing OUT/NAME.pt")
    _add_clip_arguments(create)
    create.set_defaults(run=_cmd_create)


def _cmd_create(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from lib_training.aesthetic.create import create_embedding
    from lib_training.devices import pick_device

    bar = tqdm(total=0, unit="img", dynamic_ncols=True)

    def on_progress(progress: Any) -> None:
        bar.set_description(progress.phase, refresh=False)
        bar.total, bar.n = progress.total, progress.step
        bar.refresh()

    try:
        result = create_embedding(
            args.data, args.name, args.out, clip_source(args), args.batch_size, pick_device(args.device),
            overwrite=args.overwrite, on_progress=on_progress,
        )  # fmt: skip
    finally:
        bar.close()
    print(f"wrote {result.result}: [1, {result.width}] from {result.images} images ({result.seconds:.1f} s)")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--aesthetic...` options of `generate` (the extension's controls and defaults)."""
    group = parser.add_argument_group("aesthetic gradients")
    d = _DEFAULTS
    add = group.add_argument
    add("--aesthetic", type=Path, action="append", default=None, metavar="FILE",
        help="aesthetic embedding (.pt); SDXL takes one per text encoder (give it twice)")  # fmt: skip
    add("--aesthetic-weight", type=float, default=d.weight,
        help=f"0 = the prompt's own conditioning, 1 = the personalised one (default {d.weight})")  # fmt: skip
    add("--aesthetic-steps", type=int, default=d.steps, help=f"optimisation steps per prompt (default {d.steps})")
    add("--aesthetic-lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    add("--aesthetic-slerp", action="store_true", help="mix by spherical interpolation")
    add("--aesthetic-slerp-angle", type=float, default=d.slerp_angle,
        help=f"how far --aesthetic-text turns the target (default {d.slerp_angle})")  # fmt: skip
    add("--aesthetic-text", default="", help="text for images: turn the target towards this text")
    add("--aesthetic-negative", action="store_true", help="turn away from --aesthetic-text instead")
    _add_clip_arguments(group)


def settings_from_args(args: argparse.Namespace) -> AestheticSettings:
    settings = AestheticSettings(
        weight=args.aesthetic_weight,
        steps=args.aesthetic_steps,
        lr=args.aesthetic_lr,
        slerp=args.aesthetic_slerp,
        slerp_angle=args.aesthetic_slerp_angle,
        text=args.aesthetic_text,
        text_negative=args.aesthetic_negative,
    )
    settings.check()
    return settings


@contextlib.contextmanager
def applied_from_args(model: DiffusionModel, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """While inside, `model` conditions through the aesthetic embeddings the options name; yields the
    infotext parameters to write (empty without --aesthetic)."""
    if not args.aesthetic:
        yield {}
        return
    settings = settings_from_args(args)
    embeddings = [load_embedding(path) for path in args.aesthetic]
    personaliser = Personaliser(model, clip_source(args))
    assigned = personaliser.match(embeddings)
    with aesthetic_applied(personaliser, assigned, settings):
        yield settings.infotext(", ".join(e.name for e in embeddings))
