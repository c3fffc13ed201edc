"""Which layers of a model a LoRA adapts, by kohya name, read from the model's module map.

`DiffusionModel.module_map()` lists every layer a kohya LoRA can name (canonical name and aliases,
component, whether kohya's plain LoRA or LoCon trains it, the live module and, for fused q/k/v,
the rows of in_proj_weight). One thing the map leaves to its users: nn.MultiheadAttention uses
`out_proj.weight` directly and never calls `out_proj`, so an out projection inside an attention is
adapted through the attention's forward, together with its q/k/v (`as_target`).
"""

from __future__ import annotations

from torch import nn

from lib_training.methods.lora.network import Target
from lib_training.model.diffusion import DiffusionModel
from lib_training.model.module_map import ModuleEntry


def model_layers(model: DiffusionModel) -> list[ModuleEntry]:
    """Every layer of `model` a kohya LoRA can name."""
    return list(model.module_map())


def attentions_by_out_proj(model: DiffusionModel) -> dict[int, nn.MultiheadAttention]:
    """id(out_proj) -> its nn.MultiheadAttention, over the attentions the module map lists."""
    return {
        id(entry.module.out_proj): entry.module
        for entry in model.module_map()
        if isinstance(entry.module, nn.MultiheadAttention)
    }


def as_target(entry: ModuleEntry, attentions: dict[int, nn.MultiheadAttention]) -> Target:
    """The network's target for a layer; an out_proj inside an nn.MultiheadAttention targets the attention."""
    if id(entry.module) in attentions:
        return Target(entry.kohya, attentions[id(entry.module)], out_proj=True)
    return Target(entry.kohya, entry.module, rows=entry.rows)


def names_of(entries: list[ModuleEntry]) -> dict[str, ModuleEntry]:
    """Each entry under its kohya name and its aliases."""
    return {name: entry for entry in entries for name in (entry.kohya, *entry.aliases)}
