"""Our own model code behind the model interface: load a checkpoint file, save one back.

Modules are built on the meta device from configs inferred from the file's shapes, then given the
file's tensors directly (`assign=True`), so a 7 GB SDXL checkpoint is read once, in the requested
dtype, with no random initialisation and no second copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lib_training.errors import CheckpointError
from lib_training.formats.detection import (
    PREDICTION_METADATA,
    TEXT_ENCODERS,
    UNET_PREFIX,
    VAE_PREFIX,
    TextEncoderSlot,
    V,
    detect_family,
    split_components,
    states_prediction,
    with_text_model_prefix,
)
from lib_training.formats.family import Arch, ModelFamily, Prediction
from lib_training.formats.tensor_files import TensorSource, open_tensors, save_safetensors
from lib_training.model.diffusion import DiffusionModel
from lib_training.model.module_map import ModuleRoot
from lib_training.model.networks.text_encoder import (
    ClipTextEncoder,
    TextEncoderConfig,
    text_encoder_config_from_shapes,
)
from lib_training.model.networks.unet import UNetConfig, UNetModel, unet_config_from_shapes
from lib_training.model.networks.vae import AutoencoderKL, VAEConfig, normalize_vae_state_dict, vae_config_from_shapes
from lib_training.model.noise_schedule import NoiseSchedule


@dataclass
class StandaloneModel(DiffusionModel):
    """A `DiffusionModel` made of our own modules, which can be saved back as a checkpoint."""

    metadata: dict[str, str] = field(default_factory=dict)  # the source file's metadata, kept on save
    extras: dict[str, Tensor] = field(default_factory=dict)  # keys of no component, kept on save
    source: Path | None = None

    @property
    def unet_module(self) -> UNetModel:
        return self.modules["unet"]  # type: ignore[return-value]

    @property
    def vae_module(self) -> AutoencoderKL:
        return self.modules["vae"]  # type: ignore[return-value]

    def set_gradient_checkpointing(self, enabled: bool, fraction: float = 1.0) -> None:
        """Recompute activations in the backward pass of UNet and text encoders (less memory, ~30% slower);
        `fraction`: of the UNet's blocks, highest resolution first."""
        self.unet_module.set_gradient_checkpointing(enabled, fraction)
        for encoder in self.text_encoders:
            encoder.set_gradient_checkpointing(enabled)  # type: ignore[attr-defined]

    def checkpoint_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """All weights under their single-file checkpoint keys (text encoders in their stored layout)."""
        tensors: dict[str, Tensor] = {}
        tensors.update({UNET_PREFIX + k: v for k, v in self.unet_module.state_dict().items()})
        tensors.update({VAE_PREFIX + k: v for k, v in self.vae_module.state_dict().items()})
        for slot, encoder in zip(TEXT_ENCODERS[self.family.arch], self.text_encoders):
            state = encoder.checkpoint_state_dict()  # type: ignore[attr-defined]
            tensors.update({slot.prefix + k: v for k, v in state.items()})
            if slot.position_ids:
                positions = torch.arange(encoder.config.context_length, device=self.device)[None]  # type: ignore[attr-defined]
                tensors[slot.prefix + "text_model.embeddings.position_ids"] = positions
        tensors.update(self.extras)
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        return tensors

    def save(
        self,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Write a single-file .safetensors checkpoint (atomically); the prediction type goes in metadata."""
        if Path(path).suffix.lower() != ".safetensors":
            raise CheckpointError(f"{Path(path).name}: checkpoints are saved as .safetensors only")
        meta = {**self.metadata, PREDICTION_METADATA: self.family.prediction, **(metadata or {})}
        save_safetensors(path, self.checkpoint_state_dict(dtype), meta)


def assemble(
    family: ModelFamily,
    unet: UNetModel,
    vae: AutoencoderKL,
    text_encoders: list[ClipTextEncoder],
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae_dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    extras: dict[str, Tensor] | None = None,
    source: Path | None = None,
) -> StandaloneModel:
    """Wrap loaded modules into the interface. All modules must already be on `device`."""
    modules: dict[str, nn.Module] = {"unet": unet, "vae": vae}
    modules.update({encoder.key: encoder for encoder in text_encoders})
    for module in modules.values():
        module.requires_grad_(False).eval()
    return StandaloneModel(
        family=family,
        unet=unet,
        text_encoders=list(text_encoders),
        vae=vae,
        schedule=NoiseSchedule.scaled_linear(family.prediction),
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        modules=modules,
        module_roots=[
            ModuleRoot("unet", unet, "ldm"),
            *(ModuleRoot(encoder.key, encoder, "open_clip") for encoder in text_encoders),
        ],
        metadata=metadata or {},
        extras=extras or {},
        source=source,
    )


def _tensors(source: TensorSource, prefix: str, keys: Mapping[str, object], device: torch.device, dtype: torch.dtype):
    """The tensors of one component, prefix stripped, floats converted to `dtype` on `device`."""
    out: dict[str, Tensor] = {}
    for key in keys:
        tensor = source.get(prefix + key)
        out[key] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
    return out


def _text_part(part: Mapping[str, V], slot: TextEncoderSlot) -> dict[str, V]:
    return with_text_model_prefix(part) if slot.layout == "hf" else dict(part)


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    prediction: Prediction | None = None,
) -> StandaloneModel:
    """Load an SD1/SD2/SDXL single-file checkpoint (.safetensors or .ckpt) into our own modules.

    `prediction` overrides what the file says (or, for SD2 files that say nothing, what a test of
    the UNet suggests). SDXL's VAE is kept in fp32 unless `vae_dtype` says otherwise, since it
    overflows in fp16.
    """
    path = Path(path)
    device = torch.device(device)
    with open_tensors(path) as source:
        shapes = source.shapes()
        family = detect_family(shapes, source.metadata, path.name)
        parts, other = split_components(shapes, family.arch)
        if vae_dtype is None and family.is_sdxl and dtype == torch.float16:
            vae_dtype = torch.float32

        with torch.device("meta"):
            unet = UNetModel(unet_config_from_shapes(parts["unet"], family.arch))
            vae = AutoencoderKL(vae_config_from_shapes(parts["vae"]))
            encoders = [
                ClipTextEncoder(text_encoder_config_from_shapes(_text_part(parts[slot.key], slot), preset))
                for slot, preset in zip(TEXT_ENCODERS[family.arch], TextEncoderConfig.for_arch(family.arch))
            ]
        unet.load_state_dict(_tensors(source, UNET_PREFIX, parts["unet"], device, dtype), assign=True)
        vae_state = normalize_vae_state_dict(_tensors(source, VAE_PREFIX, parts["vae"], device, vae_dtype or dtype))
        vae.load_state_dict(vae_state, assign=True)
        for slot, encoder in zip(TEXT_ENCODERS[family.arch], encoders):
            state = _tensors(source, slot.prefix, parts[slot.key], device, dtype)
            encoder.load_state_dict_from_checkpoint(_text_part(state, slot), assign=True)
        extras = {key: source.get(key) for key in other}
        metadata = dict(source.metadata)

    if prediction is not None:
        family = ModelFamily(family.arch, prediction, family.unet_in_channels)
    elif family.arch is Arch.SD2 and not states_prediction(shapes, metadata) and _unet_predicts_v(unet):
        family = ModelFamily(Arch.SD2, "v", family.unet_in_channels)
    return assemble(
        family,
        unet,
        vae,
        encoders,
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        metadata=metadata,
        extras=extras,
        source=path,
    )


@torch.no_grad()
def _unet_predicts_v(unet: UNetModel) -> bool:
    """Whether an SD2 UNet predicts v, by its answer to a constant input at the last timestep.

    At t=999 the input is nearly pure noise: an epsilon model answers with about the input, a v
    model with about minus the input. The same test A1111 uses for SD2 files without a config.
    """
    config = unet.config
    param = next(unet.parameters())
    x = torch.full((1, config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, config.context_dim), 0.5, device=param.device, dtype=param.dtype)
    out = unet(x, torch.tensor([999], device=param.device), context)
    return (out - x).float().mean().item() < -1.0


def build_random(
    family: ModelFamily,
    unet_config: UNetConfig,
    vae_config: VAEConfig,
    text_configs: tuple[TextEncoderConfig, ...],
    seed: int,
) -> StandaloneModel:
    """A model with the given structure and seeded random weights (see `lib_training.model.tiny`)."""
    from lib_training.model.tiny import randomize_weights

    generator = torch.Generator().manual_seed(seed)
    unet, vae = UNetModel(unet_config), AutoencoderKL(vae_config)
    encoders = [ClipTextEncoder(config) for config in text_configs]
    for module in (unet, vae, *encoders):
        randomize_weights(module, generator)
    return assemble(family, unet, vae, encoders, device=torch.device("cpu"), dtype=torch.float32)
