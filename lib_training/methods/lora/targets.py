"""Which layers of a model a LoRA adapts, by kohya name: kohya's default set, LoCon's, the text encoders'.

The layers come from the model's module map (`DiffusionModel.module_map()`, one entry per layer a
kohya LoRA can name: its canonical name and aliases, component, whether kohya's plain LoRA or LoCon
trains it, the live module and, for fused q/k/v, the rows of in_proj_weight). Models without a map
(before it existed) are read through `lib_training.formats.lora_keys` and our own module layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lib_training.formats.detection import TEXT_ENCODERS, UNET_PREFIX
from lib_training.formats.lora_keys import lora_targets
from lib_training.methods.lora.network import Target
from lib_training.model.diffusion import DiffusionModel

_HF_TO_OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@dataclass(frozen=True)
class Layer:
    """One layer a LoRA can adapt (the fields of the module map's entries this method uses)."""

    kohya: str
    module: nn.Module
    component: str
    default: bool
    conv: bool
    rows: tuple[int, int] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)


def model_layers(model: DiffusionModel) -> list[Any]:
    """Every layer of `model` a kohya LoRA can name (module-map entries, or `Layer`s without a map)."""
    module_map = getattr(model, "module_map", None)
    if module_map is not None:
        return list(module_map().select())
    return _layers_from_keys(model)


def as_target(entry: Any, attentions: dict[int, nn.MultiheadAttention]) -> Target:
    """The network's target for a layer entry; an out_proj inside an nn.MultiheadAttention targets the attention."""
    module = entry.module
    if id(module) in attentions:
        return Target(entry.kohya, attentions[id(module)], out_proj=True)
    return Target(entry.kohya, module, rows=entry.rows)


def attentions_by_out_proj(model: DiffusionModel) -> dict[int, nn.MultiheadAttention]:
    """id(out_proj) -> its nn.MultiheadAttention, over the model's modules."""
    found: dict[int, nn.MultiheadAttention] = {}
    for root in model.modules.values():
        for module in root.modules():
            if isinstance(module, nn.MultiheadAttention):
                found[id(module.out_proj)] = module
    return found


def names_of(entries: Iterable[Any]) -> dict[str, Any]:
    """Each entry under its kohya name and its aliases."""
    index: dict[str, Any] = {}
    for entry in entries:
        for name in (entry.kohya, *getattr(entry, "aliases", ())):
            index[name] = entry
    return index


def _layers_from_keys(model: DiffusionModel) -> list[Layer]:
    state = model.checkpoint_state_dict()  # type: ignore[attr-defined]
    shapes = {key: tuple(t.shape) for key, t in state.items()}
    slots = {slot.key: slot for slot in TEXT_ENCODERS[model.family.arch]}
    layers = []
    for target in lora_targets(shapes, model.family.arch):
        rows = target.rows
        if target.component == "unet":
            module = model.modules["unet"].get_submodule(target.key[len(UNET_PREFIX) : -len(".weight")])
        else:
            part = target.key[len(slots[target.component].prefix) :]
            module = _text_module(model.modules[target.component], part)
            if isinstance(module, nn.MultiheadAttention) and rows is None:  # HF q/k/v: our layer fuses them
                width = module.embed_dim
                index = "qkv".index(part.removesuffix("_proj.weight")[-1])
                rows = (index * width, (index + 1) * width)
        layers.append(Layer(target.name, module, target.component, target.default, target.conv, rows, target.aliases))
    return layers


def _text_module(encoder: nn.Module, part: str) -> nn.Module:
    """Our (open_clip layout) module for a text-encoder checkpoint key in HF or open_clip layout."""
    if part.startswith("text_model.encoder.layers."):
        index, rest = part[len("text_model.encoder.layers.") :].removesuffix(".weight").split(".", 1)
        if rest.endswith(("q_proj", "k_proj", "v_proj")):
            return encoder.get_submodule(f"transformer.resblocks.{index}.attn")
        return encoder.get_submodule(f"transformer.resblocks.{index}.{_HF_TO_OPEN_CLIP[rest]}")
    if part.endswith("in_proj_weight"):
        return encoder.get_submodule(part.removesuffix(".in_proj_weight"))
    return encoder.get_submodule(part.removesuffix(".weight"))
