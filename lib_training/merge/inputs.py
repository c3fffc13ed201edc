"""Opening the inputs of a merge or bake and checking, before any work, that they fit together."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lib_training.errors import CheckpointError
from lib_training.formats.detection import VAE_PREFIX, detect_family
from lib_training.formats.family import ModelFamily
from lib_training.formats.tensor_files import TensorSource
from lib_training.model.networks.vae import AutoencoderKL, vae_config_from_shapes

_STAND_IN_VAE_KEY = VAE_PREFIX + "encoder.conv_in.weight"


def family_of(source: TensorSource, label: str) -> ModelFamily:
    """The family of a checkpoint to merge; unlike loading for generation, a missing VAE is fine."""
    shapes = source.shapes()
    if not any(key.startswith(VAE_PREFIX) for key in shapes):
        shapes = {**shapes, _STAND_IN_VAE_KEY: (128, 3, 3, 3)}  # detect_family insists on a VAE
    return detect_family(shapes, source.metadata, f"{label} ({source.path.name})")


def check_same_family(families: Mapping[str, ModelFamily], paths: Mapping[str, Path]) -> list[str]:
    """Refuse inputs of different families or incompatible UNet inputs; return warnings.

    Model A must be the one with extra UNet input channels (inpainting 9, instruct-pix2pix 8) when
    the others have 4: the extra channels are kept from A and the first 4 merged, as A1111 does.
    """
    letters = list(families)
    first = letters[0]
    reference = families[first]
    warnings: list[str] = []
    for letter in letters[1:]:
        family = families[letter]
        if family.arch is not reference.arch:
            raise CheckpointError(
                f"model {letter.upper()} ({paths[letter].name}) is {family.arch.value.upper()} but model "
                f"{first.upper()} ({paths[first].name}) is {reference.arch.value.upper()}: models of different "
                "families cannot be merged. Choose models of the same family."
            )
        if family.prediction != reference.prediction:
            warnings.append(
                f"model {letter.upper()} predicts {family.prediction} and model A {reference.prediction}; "
                "the output is marked as predicting what A predicts"
            )
        channels, a_channels = family.unet_in_channels, reference.unet_in_channels
        if channels != a_channels and (channels > a_channels or channels != 4):
            raise CheckpointError(
                f"model {letter.upper()} ({paths[letter].name}) is a {family.describe()} model with {channels} UNet "
                f"input channels and model A ({paths[first].name}) has {a_channels}. Put the inpainting or "
                "instruct-pix2pix model in A: its extra channels are kept and the first 4 merged."
            )
    return warnings


def vae_entries(source: TensorSource) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The VAE weights a file provides: checkpoint key -> (key in the file, shape to write).

    The file may be a VAE on its own or a full checkpoint (its `first_stage_model.` part is used).
    Attention weights stored as Linear are written in the checkpoint's 1x1-conv shape.
    """
    keys = source.keys()
    prefixed = any(key.startswith(VAE_PREFIX) for key in keys)
    stripped = {
        key[len(VAE_PREFIX) :] if prefixed else key: key for key in keys if key.startswith(VAE_PREFIX) or not prefixed
    }
    config = vae_config_from_shapes({part: source.shape(key) for part, key in stripped.items()})
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in AutoencoderKL(config).state_dict().items()}
    return {VAE_PREFIX + name: (stripped[name], shape) for name, shape in expected.items()}
