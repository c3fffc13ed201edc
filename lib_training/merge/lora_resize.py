"""Changing a LoRA's rank: SVD of each module's up @ down, keeping the largest singular values.

As in kohya's `resize_lora`, the module's scale alpha / rank is kept (new alpha = scale · new rank)
and the factors are U·S and V^T, so the update scale · up @ down changes only by what the dropped
singular values carried. A dynamic method chooses each module's rank from its singular values,
never above the rank asked for.

A DoRA file keeps its `dora_scale` unchanged, as kohya's `resize_lora.py` does (it rewrites only
lora_up / lora_down / alpha and copies every other key; LyCORIS has no resize tool). At the same rank the
result is the same file up to rounding. At a lower rank the result is approximate, and only in
direction: each input column of the baked weight d ⊙ (W + ΔW') / ‖W + ΔW'‖ still has exactly the norm d,
while ΔW' is the best approximation of ΔW at that rank, as for a plain LoRA. The result says so in a
warning. A magnitude per output channel (LyCORIS' `wd_on_out`) is kept too, in its layout; as ComfyUI
applies it (d ⊙ (W + ΔW') / ‖W‖ per row, `lib_training.merge.dora`) the rows' norms follow ΔW' a little.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from lib_training.devices import DTYPES, pick_device
from lib_training.formats.tensor_files import open_tensors
from lib_training.merge.config import LoraResizeConfig
from lib_training.merge.lora_extract import LoraResult, low_rank
from lib_training.merge.lora_file import LoraModule, lora_tensors, read_lora, write_lora
from lib_training.merge.metadata import STALE_KEYS
from lib_training.merge.progress import CancelToken, ProgressCallback, ProgressMeter, check_cancel


def chosen_rank(singular_values: Tensor, rank: int, method: str, param: float) -> int:
    """How many singular values (sorted, descending) to keep: at most `rank`, at least 1."""
    s = singular_values.double()
    if method == "sv_ratio":  # keep those within a factor `param` of the largest
        keep = int((s >= s[0] / param).sum())
    elif method in ("sv_fro", "sv_cumulative"):
        weights = s**2 if method == "sv_fro" else s
        total = weights.sum()
        if total <= 0:
            return 1
        fraction = torch.cumsum(weights, 0) / total
        keep = int((fraction < param - 1e-12).sum()) + 1  # the first count reaching `param`
    else:
        keep = rank
    return max(1, min(keep, rank, s.numel()))


def resize_module(module: LoraModule, rank: int, method: str, param: float, device: torch.device) -> LoraModule:
    """The module at a new rank (chosen by `method`), with the same scale alpha / rank (and DoRA's
    dora_scale unchanged)."""
    weight = module.up.to(device, torch.float32).flatten(1) @ module.down.to(device, torch.float32).flatten(1)
    singular_values = torch.linalg.svdvals(weight)
    new_rank = chosen_rank(singular_values, min(rank, module.rank), method, param)
    up, down = low_rank(weight, new_rank)
    new_rank = down.shape[0]
    if module.down.ndim == 4:
        up = up.reshape(up.shape[0], new_rank, 1, 1)
        down = down.reshape(new_rank, *module.down.shape[1:])
    return LoraModule(module.name, down.contiguous(), up.contiguous(), module.scale * new_rank, module.dora_scale)


def resize_lora(
    config: LoraResizeConfig, *, progress: ProgressCallback | None = None, cancel: CancelToken = None
) -> LoraResult:
    """Write `config.out`: the LoRA `config.lora` at a new rank."""
    start = time.perf_counter()
    config.validate()
    device = pick_device(config.device)
    modules, metadata, ignored = read_lora(config.lora)
    meter = ProgressMeter(sum(math.prod(m.weight_shape) for m in modules.values()), len(modules), progress)
    resized: dict[str, LoraModule] = {}
    for name, module in modules.items():
        check_cancel(cancel, "the LoRA resize")
        conv3x3 = module.down.ndim == 4 and tuple(module.down.shape[2:]) != (1, 1)
        rank = (config.conv_rank or config.rank) if conv3x3 else config.rank
        resized[name] = resize_module(module, rank, config.dynamic_method, config.dynamic_param, device)
        meter.advance(name, math.prod(module.weight_shape), 1)
    check_cancel(cancel, "the LoRA resize")
    out = {k: v for k, v in metadata.items() if k not in STALE_KEYS}
    dynamic = config.dynamic_method != "none"
    ranks = sorted({m.rank for m in modules.values()})
    scales = {round(m.scale, 6) for m in resized.values()}
    out["ss_network_dim"] = "Dynamic" if dynamic else str(config.rank)
    out["ss_network_alpha"] = "Dynamic" if dynamic or len(scales) != 1 else f"{scales.pop() * config.rank:g}"
    args = json.loads(out.get("ss_network_args") or "{}") if out.get("ss_network_args", "").startswith("{") else {}
    if "conv_dim" in args:
        args["conv_dim"] = args["conv_alpha"] = str(config.conv_rank or config.rank)
    out["ss_network_args"] = json.dumps(args)
    method = f"{config.dynamic_method} {config.dynamic_param:g}" if dynamic else f"rank {config.rank}"
    comment = f"resized from rank {'/'.join(map(str, ranks))} ({method})"
    out["ss_training_comment"] = (
        f"{comment}; {out['ss_training_comment']}" if out.get("ss_training_comment") else comment
    )
    out["modelspec.title"] = Path(config.out).stem
    out["modelspec.date"] = datetime.datetime.now().astimezone().replace(microsecond=0).isoformat()
    tensors = lora_tensors(resized, DTYPES[config.dtype])
    if ignored:  # bundled embeddings travel along unchanged
        with open_tensors(config.lora) as source:
            tensors.update({key: source.get(key) for key in ignored})
    written = write_lora(config.out, tensors, out)
    warnings = [f"{len(ignored)} bundled embedding tensors were copied unchanged"] if ignored else []
    dora = [name for name, m in modules.items() if m.dora_scale is not None]
    lowered = [name for name in dora if resized[name].rank < modules[name].rank]
    if lowered:
        warnings.append(
            f"{len(lowered)} of {len(dora)} DoRA modules now have a lower rank: their dora_scale is kept, so the "
            "magnitudes stay, but the direction is approximate, as a resized LoRA's update is"
        )
    seconds = time.perf_counter() - start
    return LoraResult(written.path, written.data_sha256, written.metadata, seconds, len(resized), warnings)
