"""Baking kohya LoRAs into a checkpoint, streaming: W' = W + Σ strength · block weight · (alpha / rank) · up @ down.

A DoRA module adds m · (W_dora − W) instead, m = strength · block weight (`lib_training.merge.dora`): the
change the hook that applies the file at that strength makes. Each LoRA's change is taken against the
checkpoint's own W and the changes are summed, as A1111 and ComfyUI stack LoRAs.

Weights no LoRA touches are copied (converted to the output dtype) piece by piece; a changed weight
is read whole, updated in fp32 and written. The text encoders' q/k/v in open_clip layout (SD2,
SDXL bigG) are rows of one fused in_proj_weight: each LoRA module updates its own rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib_training.devices import DTYPES, pick_device
from lib_training.errors import CheckpointError
from lib_training.formats.detection import EMA_PREFIX, states_prediction
from lib_training.formats.family import ModelFamily
from lib_training.formats.file_hashes import file_sha256, legacy_hash
from lib_training.formats.lora_keys import LoraTarget, lora_targets, targets_by_name
from lib_training.formats.safetensors_writer import TensorEntry, placeholder
from lib_training.formats.tensor_files import TensorSource, read_safetensors_header
from lib_training.merge.blocks import block_of, parse_blocks
from lib_training.merge.config import LoraBakeConfig
from lib_training.merge.engine import output_dtype
from lib_training.merge.hashing import HashJob
from lib_training.merge.inputs import family_of
from lib_training.merge.lora_file import LoraModule, read_lora
from lib_training.merge.metadata import HASH_WIDTH, RECIPE_TYPE, InputModel, merged_metadata
from lib_training.merge.progress import CancelToken, ProgressCallback
from lib_training.merge.reader import get_flat_range, open_input
from lib_training.merge.stream import (
    OutputTensor,
    chunks,
    compute_threads,
    copy_model_config,
    to_output,
    write_stream,
)


@dataclass
class BakeResult:
    path: Path
    data_sha256: str  # modelspec.hash_sha256 without "0x"
    metadata: dict[str, str]
    size: int
    seconds: float
    modules: int  # LoRA modules baked (over all LoRAs)
    weights: int  # checkpoint weights changed
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Update:
    module: LoraModule
    target: LoraTarget
    factor: float  # strength · block weight


def lora_data_sha256(path: Path) -> str:
    """The hash A1111 and kohya give a LoRA: sha256 of the data after the safetensors header (of the
    whole file for a pickled LoRA)."""
    try:
        read_safetensors_header(path)
    except CheckpointError:
        return file_sha256(path) or ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _plan_updates(
    config: LoraBakeConfig, source: TensorSource, family: ModelFamily
) -> tuple[dict[str, list[_Update]], list[dict[str, Any]], list[str]]:
    """Checkpoint key -> the LoRA updates to add to it; the recipe's LoRA entries; warnings."""
    targets = targets_by_name(lora_targets(source.shapes(), family.arch))
    updates: dict[str, list[_Update]] = {}
    recipe_loras: list[dict[str, Any]] = []
    warnings: list[str] = []
    for spec in config.loras:
        path = Path(spec.path)
        modules, metadata, ignored = read_lora(path)
        blocks = parse_blocks(spec.blocks, family.arch)
        unknown = [name for name in modules if name not in targets]
        if unknown:
            raise CheckpointError(
                f"{path.name}: {len(unknown)} of its {len(modules)} modules have no place in this {family.describe()} "
                f"checkpoint (e.g. {unknown[0]}); the LoRA was made for another model family"
            )
        if ignored:
            warnings.append(f"{path.name}: {len(ignored)} bundled embedding tensors were not baked (e.g. {ignored[0]})")
        for name, module in modules.items():
            target = targets[name]
            if math.prod(module.weight_shape) != math.prod(target.shape):
                raise CheckpointError(
                    f"{path.name}: module {name} changes a weight of shape {list(module.weight_shape)} but the "
                    f"checkpoint's is {list(target.shape)}; the LoRA was made for another model"
                )
            if module.dora_scale is not None and module.weight_shape[1] != target.shape[1]:
                raise CheckpointError(
                    f"{path.name}: DoRA module {name} has {module.weight_shape[1]} input channels but the "
                    f"checkpoint's weight {list(target.shape)} has {target.shape[1]}; the LoRA was made for another "
                    "model"
                )
            factor = spec.strength * blocks.get(block_of(target.key, family.arch) or "", 1.0)
            if factor:
                updates.setdefault(target.key, []).append(_Update(module, target, factor))
        recipe_loras.append(
            {
                "name": path.name,
                "sha256": metadata.get("sshs_model_hash") or lora_data_sha256(path),
                "strength": spec.strength,
                "blocks": spec.blocks,
                "modules": len(modules),
            }
        )
    return updates, recipe_loras, warnings


def bake_loras(
    config: LoraBakeConfig, *, progress: ProgressCallback | None = None, cancel: CancelToken = None
) -> BakeResult:
    """Write `config.out`: the checkpoint `config.model` with `config.loras` baked into its weights."""
    start = time.perf_counter()
    config.validate()
    device = pick_device(config.device)
    out_dtype = DTYPES[config.dtype]
    model_path = Path(config.model)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_input(model_path))
        family = family_of(source, "the checkpoint")
        updates, recipe_loras, warnings = _plan_updates(config, source, family)

        outputs: list[OutputTensor] = []
        for key in list(source.keys()):
            if config.prune_ema and key.startswith(EMA_PREFIX):
                continue
            shape = source.shape(key)
            entry = TensorEntry(key, output_dtype(key, source.dtype(key), shape, family.arch, out_dtype), shape)
            if key in updates:
                outputs.append(OutputTensor(entry, _updated(source, key, entry, updates[key], device)))
            else:
                outputs.append(OutputTensor(entry, _copied(source, key, entry)))

        token = placeholder(HASH_WIDTH)
        data_token = placeholder(HASH_WIDTH)
        model = InputModel(model_path, source.metadata, token, legacy_hash(model_path))
        recipe = {
            "type": RECIPE_TYPE,
            "primary_model_hash": token,
            "interp_method": "lora_bake",
            "loras": recipe_loras,
            "save_as_half": config.dtype == "fp16",
            "dtype": config.dtype,
            "prune_ema": config.prune_ema,
        }
        metadata = merged_metadata(
            base=source.metadata if config.copy_metadata else None,
            recipe=recipe,
            inputs=[model],
            family=family,
            title=Path(config.out).stem,
            data_hash=data_token,
            prediction_known=states_prediction(source.shapes(), source.metadata),
        )
        metadata["modelspec.merged_from"] = ", ".join([model.title, *(Path(s.path).stem for s in config.loras)])
        job = HashJob([model_path], cancel=cancel)
        stack.callback(job.stop)
        found: dict[Path, str] = {}
        with compute_threads(reserved=2):  # cores for the writer and for hashing the checkpoint
            written = write_stream(
                config.out,
                outputs,
                metadata,
                what="the LoRA bake",
                placeholders=[token, data_token],
                values=lambda digest: {data_token: digest, token: found[model_path]},
                progress=progress,
                cancel=cancel,
                before_finish=lambda: found.update(job.result()),
            )
    if config.copy_config:
        copy_model_config([model_path], written.path)
    return BakeResult(
        path=written.path,
        data_sha256=written.data_sha256,
        metadata=written.metadata,
        size=written.size,
        seconds=time.perf_counter() - start,
        modules=sum(len(u) for u in updates.values()),
        weights=len(updates),
        warnings=warnings,
    )


def _copied(source: TensorSource, key: str, entry: TensorEntry) -> Callable[[], Iterator[Tensor]]:
    def produce() -> Iterator[Tensor]:
        for begin, end in chunks(math.prod(entry.shape)):
            piece = get_flat_range(source, key, begin, end)
            yield piece if piece.dtype == entry.dtype else piece.to(entry.dtype)

    return produce


def _updated(
    source: TensorSource, key: str, entry: TensorEntry, updates: list[_Update], device: torch.device
) -> Callable[[], Iterator[Tensor]]:
    def produce() -> Iterator[Tensor]:
        weight = source.get(key).to(device=device, dtype=torch.float32)
        # DoRA's change depends on W: every LoRA's is taken against the checkpoint's own weight
        original = weight.clone() if any(u.module.dora_scale is not None for u in updates) else weight
        for update in updates:
            if update.target.rows is None:
                weight += update.module.change(original, update.factor)
            else:
                begin, end = update.target.rows
                weight[begin:end] += update.module.change(original[begin:end], update.factor)
        yield to_output(weight, entry.dtype)

    return produce
