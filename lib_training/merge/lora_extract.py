"""Extracting a kohya LoRA from a fine-tuned model and its base: a truncated SVD of each layer's change.

For each targeted layer, D = tuned - base (a 3x3 convolution's D flattened to [out, in·9]) is
approximated as up @ down with up = U_r·S_r and down = V_r^T from the SVD, r the rank. As in kohya's
`extract_lora_from_models`, alpha = rank (scale 1) and both factors are clamped to the
`clamp_quantile` quantile of their values (a few outliers otherwise dominate fp16 storage); a
text encoder that did not change (largest difference at most `min_diff`) is left out.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lib_training.devices import DTYPES, pick_device
from lib_training.errors import CheckpointError
from lib_training.formats.detection import states_prediction
from lib_training.formats.family import Arch, ModelFamily
from lib_training.formats.lora_keys import LoraTarget, lora_targets
from lib_training.merge.config import LoraExtractConfig
from lib_training.merge.inputs import check_same_family, family_of
from lib_training.merge.lora_file import LoraModule, lora_tensors, write_lora
from lib_training.merge.metadata import MODELSPEC_ARCHITECTURES, MODELSPEC_IMPLEMENTATION, modelspec
from lib_training.merge.progress import CancelToken, ProgressCallback, ProgressMeter, check_cancel
from lib_training.merge.reader import open_input

BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}


@dataclass
class LoraResult:
    path: Path
    data_sha256: str  # sshs_model_hash / modelspec.hash_sha256 (without "0x")
    metadata: dict[str, str]
    seconds: float
    modules: int
    warnings: list[str] = field(default_factory=list)


def quantile_value(values: Tensor, q: float) -> Tensor:
    """The q-quantile of `values`, interpolated linearly as torch.quantile does, without its size limit."""
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    below, above = math.floor(position), math.ceil(position)
    low = flat.kthvalue(below + 1).values
    high = flat.kthvalue(above + 1).values if above != below else low
    return low + (position - below) * (high - low)


def low_rank(difference: Tensor, rank: int, clamp_quantile: float = 1.0) -> tuple[Tensor, Tensor]:
    """up [out, r], down [r, in] with up @ down the best rank-r approximation of a 2-D `difference`."""
    rank = min(rank, *difference.shape)
    u, s, vh = torch.linalg.svd(difference, full_matrices=False)
    up = u[:, :rank] * s[:rank]  # [out, r]
    down = vh[:rank]  # [r, in]
    if clamp_quantile < 1:
        limit = quantile_value(torch.cat([up.flatten(), down.flatten()]), clamp_quantile).abs()
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return up, down


def module_from_difference(name: str, difference: Tensor, rank: int, clamp_quantile: float) -> LoraModule:
    """A LoRA module (alpha = rank) approximating a weight change of shape [out, in] or [out, in, kh, kw]."""
    out_features = difference.shape[0]
    up, down = low_rank(difference.reshape(out_features, -1), rank, clamp_quantile)
    r = down.shape[0]
    if difference.ndim == 4:
        up = up.reshape(out_features, r, 1, 1)
        down = down.reshape(r, *difference.shape[1:])
    return LoraModule(name, down.contiguous(), up.contiguous(), float(r))


def lora_metadata(
    family: ModelFamily, title: str, rank: int, alpha: float, conv_rank: int, prediction_known: bool = True
) -> dict[str, str]:
    """The ss_* and modelspec metadata kohya writes for a LoRA of `family`."""
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)} if conv_rank else {}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family.name],
        "ss_v2": str(family.arch is Arch.SD2),
        "ss_output_name": title,
    }
    metadata.update(modelspec(family, title, prediction_known=prediction_known))
    metadata["modelspec.architecture"] = MODELSPEC_ARCHITECTURES[family.name] + "/lora"
    # kohya: the SDXL LoRA layout is SGM's; SD1/SD2 LoRAs name diffusers modules
    metadata["modelspec.implementation"] = MODELSPEC_IMPLEMENTATION if family.is_sdxl else "diffusers"
    return metadata


def extract_lora(
    config: LoraExtractConfig, *, progress: ProgressCallback | None = None, cancel: CancelToken = None
) -> LoraResult:
    """Write `config.out`: a LoRA that turns `config.base` into (approximately) `config.tuned`."""
    start = time.perf_counter()
    config.validate()
    device = pick_device(config.device)
    warnings: list[str] = []
    paths = {"base": Path(config.base), "tuned": Path(config.tuned)}
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(open_input(paths["base"]))
        tuned = stack.enter_context(open_input(paths["tuned"]))
        families = {"a": family_of(base, "the base model"), "b": family_of(tuned, "the tuned model")}
        warnings += check_same_family(families, {"a": paths["base"], "b": paths["tuned"]})
        family = families["a"]
        tuned_shapes = tuned.shapes()
        targets = [
            t
            for t in lora_targets(base.shapes(), family.arch)
            if (t.default or (config.conv_rank > 0 and t.conv)) and tuned_shapes.get(t.key) == base.shape(t.key)
        ]
        if not targets:
            raise CheckpointError("the two models have no layer a LoRA can change in common")

        cache: dict[str, Tensor] = {}

        def difference(target: LoraTarget) -> Tensor:
            if target.key not in cache:
                cache.clear()  # q, k and v of a fused in_proj come one after the other
                cache[target.key] = tuned.get(target.key).to(device, torch.float32) - base.get(target.key).to(
                    device, torch.float32
                )
            full = cache[target.key]
            return full if target.rows is None else full[target.rows[0] : target.rows[1]]

        unchanged = _unchanged_text_encoders(targets, difference, config.min_diff)
        if unchanged:
            warnings.append(
                f"text encoder(s) {', '.join(sorted(unchanged))} did not change by more than {config.min_diff}: "
                "left out of the LoRA"
            )
            targets = [t for t in targets if t.component not in unchanged]
        meter = ProgressMeter(sum(math.prod(t.shape) for t in targets), len(targets), progress)
        modules: dict[str, LoraModule] = {}
        for target in targets:
            check_cancel(cancel, "the LoRA extraction")
            rank = config.conv_rank if target.is_conv3x3 else config.rank
            modules[target.name] = module_from_difference(target.name, difference(target), rank, config.clamp_quantile)
            meter.advance(target.name, math.prod(target.shape), 1)
        check_cancel(cancel, "the LoRA extraction")
        title = Path(config.out).stem
        known = family.arch is Arch.SD1 or states_prediction(base.shapes(), base.metadata)
        metadata = lora_metadata(family, title, config.rank, float(config.rank), config.conv_rank, known)
        written = write_lora(config.out, lora_tensors(modules, DTYPES[config.dtype]), metadata)
    seconds = time.perf_counter() - start
    return LoraResult(written.path, written.data_sha256, written.metadata, seconds, len(modules), warnings)


def _unchanged_text_encoders(targets: list[LoraTarget], difference, min_diff: float) -> set[str]:
    largest: dict[str, float] = {}
    for target in targets:
        if target.component != "unet":
            value = difference(target).abs().max().item()
            largest[target.component] = max(largest.get(target.component, 0.0), value)
    return {component for component, value in largest.items() if value <= min_diff}
