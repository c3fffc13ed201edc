"""Metadata of merged checkpoints, in the A1111 and ModelSpec conventions.

- `sd_merge_recipe`: JSON of how the file was made: A1111's fields (`type`, `primary_model_hash`,
  `secondary_model_hash`, `tertiary_model_hash`, `interp_method`, `multiplier`, `bake_in_vae`,
  `discard_weights`, `is_inpainting`, `is_instruct_pix2pix`, ...) plus our other settings. `type`
  is "sd-webui-training" (A1111 writes "webui").
- `sd_merge_models`: JSON, sha256 of each input -> {name, legacy_hash, sd_merge_recipe}, merged
  with each input's own `sd_merge_models`, so the whole family tree is kept (A1111's rule).
  Hashes are of whole files, as A1111 computes them.
- `modelspec.merged_from`: the inputs' titles (their `modelspec.title`, else the file name stem),
  comma-separated.
- `modelspec.hash_sha256`: "0x" + sha256 of the output's tensor data (the bytes after the header),
  as the ModelSpec spec defines it: a file cannot hold the hash of its own header. It is what
  kohya's `sshs_model_hash` also covers; A1111's own sha256 of a checkpoint covers the whole file
  and is not recorded inside it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_training.formats.family import Arch, ModelFamily

RECIPE_TYPE = "sd-webui-training"
MODELSPEC_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
# Keys of an input's metadata that describe that file only and must not be copied to the output.
STALE_KEYS = (
    "modelspec.hash_sha256",
    "modelspec.merged_from",
    "modelspec.title",
    "modelspec.date",
    "sshs_model_hash",
    "sshs_legacy_hash",
    "sd_merge_recipe",
    "sd_merge_models",
)
HASH_WIDTH = 64  # hex digits of a sha256


@dataclass(frozen=True)
class InputModel:
    """An input of a merge as the metadata records it."""

    path: Path
    metadata: Mapping[str, str]
    sha256: str | None  # hex digest, a placeholder of the same width patched in later, or None (not hashed)
    legacy_hash: str  # A1111's old 8-digit hash

    @property
    def title(self) -> str:
        return self.metadata.get("modelspec.title") or self.path.stem


def parse_json(text: str | None) -> Any:
    """A metadata value that holds JSON (as A1111 reads them), or the text itself if it is not JSON."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def merge_models(inputs: Sequence[InputModel]) -> dict[str, Any]:
    """`sd_merge_models`: each input by sha256, then the entries each input itself records.

    An input without a sha256 (not hashed) has no entry of its own; its parents' entries are kept.
    """
    models: dict[str, Any] = {}
    for model in inputs:
        if model.sha256 is not None:
            models[model.sha256] = {
                "name": model.path.name,
                "legacy_hash": model.legacy_hash,
                "sd_merge_recipe": parse_json(model.metadata.get("sd_merge_recipe")),
            }
        parents = parse_json(model.metadata.get("sd_merge_models"))
        if isinstance(parents, dict):
            models.update(parents)
    return models


def modelspec(
    family: ModelFamily, title: str, *, prediction_known: bool = True, now: datetime.datetime | None = None
) -> dict[str, str]:
    """The ModelSpec keys that describe a full checkpoint of `family`.

    Without `prediction_known` (an SD2 or SDXL file that does not say whether it predicts v), the
    prediction type is left out rather than guessed, so loaders keep detecting it.
    """
    now = now or datetime.datetime.now().astimezone()
    size = family.default_size
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURES[family.name],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": now.replace(microsecond=0).isoformat(),
    }
    if prediction_known:
        spec["modelspec.prediction_type"] = family.prediction
    return spec


def merged_metadata(
    *,
    base: Mapping[str, str] | None,
    recipe: Mapping[str, Any],
    inputs: Sequence[InputModel],
    family: ModelFamily,
    title: str,
    data_hash: str,
    prediction_known: bool = False,
) -> dict[str, str]:
    """The output's metadata: `base` (model A's, or nothing) without its stale keys, then ours.

    `data_hash` is the value (or placeholder) of the tensor-data sha256, without "0x";
    `prediction_known` whether model A's file states what its UNet predicts.
    """
    metadata = {k: v for k, v in (base or {}).items() if k not in STALE_KEYS}
    spec = modelspec(family, title, prediction_known=family.arch is Arch.SD1 or prediction_known)
    for key in ("modelspec.architecture", "modelspec.resolution"):  # what model A says wins
        spec[key] = metadata.get(key, spec[key])
    metadata.update(spec)
    metadata["format"] = "pt"
    metadata["sd_merge_recipe"] = json.dumps(dict(recipe))
    metadata["sd_merge_models"] = json.dumps(merge_models(inputs))
    if len(inputs) > 1:
        metadata["modelspec.merged_from"] = ", ".join(model.title for model in inputs)
    metadata["modelspec.hash_sha256"] = "0x" + data_hash
    return metadata
