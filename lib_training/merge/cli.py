"""The `merge` and `lora bake|extract|resize` subcommands, their options generated from the config dataclasses.

`add_merge_parsers(subparsers)` registers them on the main parser's subparsers; each sets
`run`, which raises `lib_training.errors.UserError` subclasses for user errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from lib_training.errors import ConfigError
from lib_training.merge.blocks import PRESETS
from lib_training.merge.config import (
    LoraBakeConfig,
    LoraExtractConfig,
    LoraResizeConfig,
    LoraSpec,
    MergeConfig,
)
from lib_training.merge.methods import MERGE_METHODS
from lib_training.merge.progress import WriteProgress
from lib_training.options import add_arguments, from_namespace


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of a config dataclass (see `lib_training.options.add_arguments`)."""
    add_arguments(parser, cls)


def config_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """The config dataclass `cls` from parsed options (and `values` for fields not given as options)."""
    return dataclasses.replace(from_namespace(cls, args), **values) if values else from_namespace(cls, args)


def _progress_bar(description: str) -> tuple[Callable[[WriteProgress], None], Callable[[], None]]:
    """A tqdm bar on stderr fed by progress reports, and a function that closes it. The bar appears
    with the first report, so an error found before any work is printed on a line of its own."""
    from tqdm import tqdm

    bars: list[tqdm] = []

    def update(progress: WriteProgress) -> None:
        if not bars:
            bars.append(tqdm(total=0, unit="B", unit_scale=True, desc=description, file=sys.stderr, leave=False))
        bar = bars[0]
        bar.total = progress.total_bytes
        bar.update(progress.done_bytes - bar.n)

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


def _report(path: object, seconds: float, digest: str, warnings: list[str], extra: str = "") -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {path} in {seconds:.1f} s{extra}; sha256 of its tensor data: {digest}")


def _run_merge(args: argparse.Namespace) -> None:
    from lib_training.merge.engine import merge

    config = config_from_args(MergeConfig, args)
    update, close = _progress_bar("merging")
    try:
        result = merge(config, progress=update)
    finally:
        close()
    _report(result.path, result.seconds, result.data_sha256, result.warnings, f" ({result.merged} tensors merged)")


def _run_bake(args: argparse.Namespace) -> None:
    from lib_training.merge.lora_bake import bake_loras

    strengths = args.strength or []
    blocks = args.lora_blocks or []
    if len(strengths) > len(args.lora) or len(blocks) > len(args.lora):
        raise ConfigError("give at most one --strength and one --lora-blocks per --lora, in the same order")
    specs = [
        LoraSpec(path, strengths[i] if i < len(strengths) else 1.0, blocks[i] if i < len(blocks) else "")
        for i, path in enumerate(args.lora)
    ]
    config = config_from_args(LoraBakeConfig, args, loras=specs)
    update, close = _progress_bar("baking")
    try:
        result = bake_loras(config, progress=update)
    finally:
        close()
    _report(result.path, result.seconds, result.data_sha256, result.warnings, f" ({result.modules} LoRA modules)")


def _run_extract(args: argparse.Namespace) -> None:
    from lib_training.merge.lora_extract import extract_lora

    result = extract_lora(config_from_args(LoraExtractConfig, args))
    _report(result.path, result.seconds, result.data_sha256, result.warnings, f" ({result.modules} modules)")


def _run_resize(args: argparse.Namespace) -> None:
    from lib_training.merge.lora_resize import resize_lora

    result = resize_lora(config_from_args(LoraResizeConfig, args))
    _report(result.path, result.seconds, result.data_sha256, result.warnings, f" ({result.modules} modules)")


def add_merge_parsers(subparsers: Any) -> None:
    """Register `merge` and `lora` (bake, extract, resize) on an argparse subparsers object."""
    methods = "; ".join(f"{m.name}: {m.formula}" for m in MERGE_METHODS.values())
    merge = subparsers.add_parser(
        "merge",
        help="merge checkpoints (weighted sum, add difference, TIES, DARE, ...), streaming",
        description=f"Merge checkpoints tensor by tensor into a new .safetensors file. Methods: {methods}.",
    )
    add_config_arguments(merge, MergeConfig)
    merge.set_defaults(run=_run_merge)

    lora = subparsers.add_parser("lora", help="bake, extract or resize kohya-format LoRAs")
    tools = lora.add_subparsers(dest="lora_command", required=True, metavar="TOOL")

    bake = tools.add_parser(
        "bake",
        help="bake LoRAs into a checkpoint",
        description="Add LoRAs to a checkpoint's weights (W += strength · alpha/rank · up @ down), streaming.",
    )
    bake.add_argument("--lora", action="append", required=True, help="LoRA file; repeat for several")
    bake.add_argument("--strength", type=float, action="append", help="strength of the matching --lora (default 1)")
    bake.add_argument(
        "--lora-blocks",
        action="append",
        help=f"block weights of the matching --lora: 26 values (SD1/SD2), 20 (SDXL) or a preset ({', '.join(PRESETS)})",
    )
    add_config_arguments(bake, LoraBakeConfig)
    bake.set_defaults(run=_run_bake)

    extract = tools.add_parser(
        "extract",
        help="extract a LoRA from a tuned model and its base",
        description="Approximate tuned - base by a low-rank LoRA (SVD of each layer's change), kohya format.",
    )
    add_config_arguments(extract, LoraExtractConfig)
    extract.set_defaults(run=_run_extract)

    resize = tools.add_parser(
        "resize",
        help="change a LoRA's rank",
        description="Re-factor each module's up @ down by SVD at a new (or a per-module, dynamic) rank.",
    )
    add_config_arguments(resize, LoraResizeConfig)
    resize.set_defaults(run=_run_resize)
