"""The single-file (LDM) checkpoint layout: where each component's keys live, and which family a file is.

Detection reads only key names, shapes and metadata, so it costs nothing on a lazily opened
safetensors file and treats tiny and full-size checkpoints alike. A file that is not an SD1, SD2
or SDXL checkpoint (a LoRA, an embedding, a VAE, a diffusers folder's UNet, another architecture)
is refused with a message that says what it looks like instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from lib_training.errors import CheckpointError
from lib_training.formats.family import Arch, ModelFamily, Prediction

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."

Shapes = Mapping[str, tuple[int, ...]]
V = TypeVar("V")


@dataclass(frozen=True)
class TextEncoderSlot:
    key: str  # "clip_l", "clip_h", "clip_g"
    prefix: str  # where its keys live in the checkpoint
    layout: Literal["hf", "open_clip"]  # how its keys are spelled there
    position_ids: bool = False  # SD1 files carry HF's int64 `position_ids` buffer [1, 77]; we write it too


TEXT_ENCODERS: dict[Arch, tuple[TextEncoderSlot, ...]] = {
    Arch.SD1: (TextEncoderSlot("clip_l", "cond_stage_model.transformer.", "hf", position_ids=True),),
    Arch.SD2: (TextEncoderSlot("clip_h", "cond_stage_model.model.", "open_clip"),),
    Arch.SDXL: (
        TextEncoderSlot("clip_l", "conditioner.embedders.0.transformer.", "hf"),
        TextEncoderSlot("clip_g", "conditioner.embedders.1.model.", "open_clip"),
    ),
}

# Keys of LDM checkpoints that hold no weights we use: the noise schedule buffers LDM saves, and
# the learned log-variance. They are recomputed, not read.
_SCHEDULE_BUFFERS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_(recip(m1)?_)?alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|posterior_\w+|logvar|model_ema\.\w+|v_pred)$"
)


def component_prefixes(arch: Arch) -> dict[str, str]:
    """Component name -> key prefix: "unet", "vae" and each text encoder's key."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    prefixes.update({slot.key: slot.prefix for slot in TEXT_ENCODERS[arch]})
    return prefixes


def split_components(shapes: Shapes, arch: Arch) -> tuple[dict[str, dict[str, tuple[int, ...]]], list[str]]:
    """Group keys by component, prefixes stripped; also return keys that belong to none.

    EMA weights and schedule buffers are neither: they are dropped.
    """
    prefixes = component_prefixes(arch)
    parts: dict[str, dict[str, tuple[int, ...]]] = {name: {} for name in prefixes}
    other: list[str] = []
    for key, shape in shapes.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = shape
                break
        else:
            if not (key.startswith(EMA_PREFIX) or _SCHEDULE_BUFFERS.match(key)):
                other.append(key)
    return parts, other


def with_text_model_prefix(part: Mapping[str, V]) -> dict[str, V]:
    """Very old SD1 files spell CLIP-L keys without `text_model.`; give every HF-layout key that prefix."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in part.items()}


def _looks_like(keys: list[str]) -> str | None:
    """What a file that is not a full checkpoint looks like, in words, or None."""
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k for k in keys):
        return (
            "a LoRA (keys like 'lora_unet_…'), not a checkpoint. Load a full model checkpoint; use the LoRA "
            "with <lora:name:weight> in a prompt, or bake it into a checkpoint in the Merge tab"
        )
    if any(k.startswith("string_to_param.") for k in keys) or set(keys) <= {"emb_params", "clip_l", "clip_g"}:
        return "a textual-inversion embedding, not a checkpoint. Put it in the embeddings folder"
    if any(re.match(r"^\d+\.\d\.linear\.\d+\.(weight|bias)$", k) for k in keys):
        return "a hypernetwork, not a checkpoint. Put it in the hypernetworks folder"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys) and not any(k.startswith("model.") for k in keys):
        return (
            "a diffusers-format model part (keys like 'down_blocks.0…'), not a single-file checkpoint. "
            "Use the single-file .safetensors of the model"
        )
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys) and not any(
        k.startswith(UNET_PREFIX) for k in keys
    ):
        return "a VAE on its own, not a checkpoint. Pass it as the VAE, together with a full checkpoint"
    if any(k.startswith("input_blocks.") for k in keys):
        return "a bare UNet without text encoder and VAE. Use the full single-file checkpoint"
    return None


_OTHER_ARCHITECTURES = {
    "joint_blocks.": "Stable Diffusion 3",
    "double_blocks.": "Flux",
    "x_embedder.": "a transformer-based model (SD3, Flux, PixArt or similar)",
}


def detect_family(shapes: Shapes, metadata: Mapping[str, str], name: str) -> ModelFamily:
    """Which SD family the checkpoint named `name` is, from its keys, shapes and metadata.

    SD2 models predicting v and those predicting epsilon share keys; unless the metadata says,
    the prediction is reported as epsilon here and the caller may test the UNet (see standalone).
    """
    keys = list(shapes)
    if not keys:
        raise CheckpointError(f"{name} holds no tensors")
    unet_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet_in is None:
        for marker, what in _OTHER_ARCHITECTURES.items():
            if any(k.startswith(UNET_PREFIX + marker) for k in keys):
                raise CheckpointError(f"{name} is {what}; only SD1, SD2 and SDXL checkpoints are supported")
        looks = _looks_like(keys)
        if looks:
            raise CheckpointError(f"{name} is {looks}.")
        sample = ", ".join(repr(k) for k in keys[:3])
        raise CheckpointError(
            f"{name} has an unknown layout (first keys: {sample}). Expected an SD1, SD2 or SDXL single-file "
            "checkpoint with keys starting 'model.diffusion_model.'."
        )

    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise CheckpointError(f"{name} is an SDXL refiner; only base models (SD1, SD2, SDXL base) can be trained")
    arch = _arch_from_text_encoders(keys)
    if arch is None:
        raise CheckpointError(
            f"{name} has a UNet but no text encoder (no 'cond_stage_model.' or 'conditioner.embedders.' "
            "keys). Use a full checkpoint that includes its text encoder."
        )
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise CheckpointError(
            f"{name} has no VAE (no 'first_stage_model.' keys). Use a checkpoint with a baked-in VAE, or "
            "bake one in with the Merge tab."
        )
    return ModelFamily(arch, _prediction(shapes, metadata) or "epsilon", unet_in_channels=int(unet_in[1]))


def _arch_from_text_encoders(keys: list[str]) -> Arch | None:
    for arch in (Arch.SDXL, Arch.SD2, Arch.SD1):
        if all(any(k.startswith(slot.prefix) for k in keys) for slot in TEXT_ENCODERS[arch]):
            return arch
    return None


PREDICTION_METADATA = "modelspec.prediction_type"


def _prediction(shapes: Shapes, metadata: Mapping[str, str]) -> Prediction | None:
    """The prediction type if the file states it: modelspec metadata, or ComfyUI's `v_pred` marker key."""
    if "v_pred" in shapes:
        return "v"
    value = metadata.get(PREDICTION_METADATA, "").strip().lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v"
    if value in ("epsilon", "eps"):
        return "epsilon"
    return None


def states_prediction(shapes: Shapes, metadata: Mapping[str, str]) -> bool:
    """Whether the file itself says what its UNet predicts."""
    return _prediction(shapes, metadata) is not None
