"""kohya-format LoRA files: the tensors, the `ss_*` / `modelspec.*` metadata, and reading any such file.

Per module NAME (kohya's name for the family, `lib_training.formats.lora_keys`):
`NAME.lora_down.weight` [r, in] (conv [r, in, kh, kw]), `NAME.lora_up.weight` [out, r] (conv
[out, r, 1, 1]), `NAME.alpha` (0-dim) and, for DoRA, `NAME.dora_scale` [1, in] (conv [1, in, 1, 1]; files
with it per output channel, [out, 1(, 1, 1)] as LyCORIS' `wd_on_out` writes it, are read too), every tensor
in the save dtype, as kohya and LyCORIS save them. `sshs_model_hash`, `sshs_legacy_hash` and
`modelspec.hash_sha256` are written by `lib_training.merge.lora_file.write_lora`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib_training.errors import CheckpointError
from lib_training.formats.family import Arch, ModelFamily
from lib_training.formats.tensor_files import open_tensors
from lib_training.merge.lora_file import module_weights, write_lora
from lib_training.merge.metadata import modelspec

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
_PART = re.compile(r"^(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")


@dataclass
class ModuleWeights:
    """One module of a LoRA file."""

    down: Tensor  # [r, in] or [r, in, kh, kw]
    up: Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    dora_scale: Tensor | None = None  # [1, in(, 1, 1)], or per output channel [out, 1(, 1, 1)]


@dataclass
class LoraFile:
    modules: dict[str, ModuleWeights]  # by the name in the file
    metadata: dict[str, str]
    other: list[str]  # keys that are neither LoRA modules nor bundled embeddings
    bundles: dict[str, dict[str, Tensor]]  # token -> part ("string_to_param.*", "clip_l", "clip_g") -> vectors


BUNDLE_PREFIX = "bundle_emb."  # A1111 loads `bundle_emb.<token>.<part>` as the embedding <token>


def bundle_tensors(token: str, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An embedding bundled in a LoRA, as A1111 reads it: SD1/SD2 `bundle_emb.<token>.string_to_param.*`
    [n, width]; SDXL `bundle_emb.<token>.clip_l` and `.clip_g`. fp32 (they are small; A1111 converts)."""
    if set(vectors) == {"clip_l", "clip_g"}:
        parts = dict(vectors)
    elif len(vectors) == 1:
        parts = {"string_to_param.*": next(iter(vectors.values()))}
    else:
        raise ValueError(f"cannot bundle an embedding with parts {sorted(vectors)}")
    return {
        f"{BUNDLE_PREFIX}{token}.{part}": vectors.detach().to("cpu", torch.float32).contiguous()
        for part, vectors in parts.items()
    }


def bundled_vectors(parts: Mapping[str, Tensor], encoder_keys: list[str]) -> dict[str, Tensor]:
    """A bundle's vectors by text-encoder key ("clip_l", ...), for a model with `encoder_keys`."""
    if "string_to_param.*" in parts and len(encoder_keys) == 1:
        return {encoder_keys[0]: parts["string_to_param.*"].float()}
    if set(encoder_keys) <= set(parts):
        return {key: parts[key].float() for key in encoder_keys}
    raise CheckpointError(f"a bundled embedding has parts {sorted(parts)}; this model needs {encoder_keys}")


def write_lora_file(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write atomically, with kohya's and ModelSpec's hashes."""
    write_lora(path, tensors, metadata)


def read_lora_file(path: str | os.PathLike[str]) -> LoraFile:
    """Any kohya LoRA / LoCon / DoRA file (`lora_up` / `lora_down` / `alpha` / `dora_scale`)."""
    path = Path(path)
    parts: dict[str, dict[str, Tensor]] = {}
    other: list[str] = []
    bundles: dict[str, dict[str, Tensor]] = {}
    with open_tensors(path) as source:
        keys = source.keys()
        for key in keys:
            if key.startswith(BUNDLE_PREFIX) and key.count(".") >= 2:
                token, part = key[len(BUNDLE_PREFIX) :].split(".", 1)
                bundles.setdefault(token, {})[part] = source.get(key)
                continue
            found = _PART.match(key)
            if found is None:
                other.append(key)
                continue
            parts.setdefault(found["name"], {})[found["part"]] = source.get(key)
        metadata = dict(source.metadata)
    modules: dict[str, ModuleWeights] = {}
    for name, found in parts.items():
        modules[name] = ModuleWeights(*module_weights(path, name, found))
    if not modules:
        kinds = sorted({key.split(".")[-2] if "." in key else key for key in other})[:4]
        raise CheckpointError(
            f"{path.name} holds no kohya LoRA modules (lora_up / lora_down); its keys look like {kinds}. "
            "Only LoRA, LoCon and DoRA files apply as <lora:...>."
        )
    return LoraFile(modules, metadata, other, bundles)


@dataclass(frozen=True)
class RunFacts:
    """What the metadata says of the training run (kohya's `ss_*` keys)."""

    steps: int
    started_at: float  # time.time() when the run began
    learning_rate: str
    unet_lr: str
    text_encoder_lr: str
    optimizer: str
    lr_scheduler: str
    resolution: int
    seed: int
    noise_offset: float
    min_snr_gamma: float
    mixed_precision: str
    num_train_images: int
    dataset_dirs: Mapping[str, Mapping[str, int]]  # folder -> {"n_repeats", "img_count"}
    tag_frequency: Mapping[str, Mapping[str, int]]  # folder -> tag -> count
    clip_skip: int | None = None


def lora_metadata(
    *,
    name: str,
    family: ModelFamily,
    network: Mapping[str, Any],
    run: RunFacts | None,
    step: int,
    model_name: str = "",
    model_hash: str = "",
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """kohya's `ss_*` and ModelSpec's `modelspec.*` keys (all strings) for a LoRA trained on `family`.

    `network` holds module, dim, alpha and args (kohya's `ss_network_*`).
    """
    now = now or datetime.datetime.now().astimezone()
    meta: dict[str, str] = {
        "ss_output_name": name,
        "ss_network_module": str(network["module"]),
        "ss_network_dim": str(network["dim"]),
        "ss_network_alpha": str(network["alpha"]),
        "ss_network_args": json.dumps(network.get("args", {})),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family.name],
        "ss_v2": str(family.arch is Arch.SD2),
        "ss_steps": str(step),
        "ss_sd_model_name": model_name,
        "ss_training_finished_at": str(now.timestamp()),
    }
    if model_hash:
        meta["ss_sd_model_hash"] = model_hash
    if run is not None:
        meta.update(
            {
                "ss_training_started_at": str(run.started_at),
                "ss_max_train_steps": str(run.steps),
                "ss_learning_rate": run.learning_rate,
                "ss_unet_lr": run.unet_lr,
                "ss_text_encoder_lr": run.text_encoder_lr,
                "ss_optimizer": run.optimizer,
                "ss_lr_scheduler": run.lr_scheduler,
                "ss_resolution": f"({run.resolution}, {run.resolution})",
                "ss_seed": str(run.seed),
                "ss_noise_offset": str(run.noise_offset),
                "ss_min_snr_gamma": str(run.min_snr_gamma),
                "ss_mixed_precision": run.mixed_precision,
                "ss_num_train_images": str(run.num_train_images),
                "ss_dataset_dirs": json.dumps(run.dataset_dirs),
                "ss_tag_frequency": json.dumps(run.tag_frequency),
                "ss_clip_skip": "None" if run.clip_skip is None else str(run.clip_skip),
            }
        )
    spec = modelspec(family, name, prediction_known=True, now=now)
    spec["modelspec.architecture"] += "/lora"
    if family.arch is not Arch.SDXL:  # kohya: a LoRA of SD1/SD2 is a diffusers-style model
        spec["modelspec.implementation"] = "diffusers"
    if run is not None:
        spec["modelspec.resolution"] = f"{run.resolution}x{run.resolution}"
    return {**meta, **spec}


def tag_frequency(captions: Mapping[str, list[str]]) -> dict[str, dict[str, int]]:
    """folder -> tag -> count over the captions of each folder (comma-separated tags, stripped)."""
    frequency: dict[str, dict[str, int]] = {}
    for folder, texts in captions.items():
        counts = frequency.setdefault(folder, {})
        for text in texts:
            for tag in (t.strip() for t in text.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return frequency
