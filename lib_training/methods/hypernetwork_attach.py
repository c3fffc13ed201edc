"""Where a hypernetwork attaches: every attention layer's k and v projections in the UNet.

A1111 runs the context of every attention layer through the hypernetwork modules of the context's
width: cross-attention (attn2) reads the text context, self-attention (attn1) its own features.
`find_kv_sites` lists those layers' `to_k` / `to_v` Linears with the width they read, found
through the model's module map (`DiffusionModel.module_map()`), so the same code finds them in our
standalone model, in A1111's ldm/sgm UNet and in Forge's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lib_training.model.diffusion import DiffusionModel


@dataclass(frozen=True)
class KVSite:
    """One attention layer's k and v projections."""

    name: str  # module path in the UNet, e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    to_k: nn.Linear
    to_v: nn.Linear
    width: int  # in_features of to_k and to_v: the width of the context they read
    cross: bool  # cross-attention on the text context (attn2); else self-attention


def find_kv_sites(model: DiffusionModel) -> list[KVSite]:
    """Every UNet attention layer's k and v projections, from the model's module map (map order)."""
    entries = model.module_map().select(component="unet", kinds={"attn_v"})
    values = {_layer(entry.path): entry for entry in entries}
    sites = []
    for key_entry in model.module_map().select(component="unet", kinds={"attn_k"}):
        layer = _layer(key_entry.path)
        value_entry = values.get(layer)
        if value_entry is None or key_entry.in_features != value_entry.in_features:
            continue  # not an attention layer that reads one context
        if not (isinstance(key_entry.module, nn.Linear) and isinstance(value_entry.module, nn.Linear)):
            continue
        cross = "cross_attn" in key_entry.kinds
        sites.append(KVSite(layer, key_entry.module, value_entry.module, key_entry.in_features, cross))
    if not sites:
        raise ValueError("the model's module map lists no UNet attention k / v projections")
    return sites


def _layer(path: str) -> str:
    """'….attn2.to_k' -> '….attn2'."""
    return path.rsplit(".", 1)[0]


def widths_text(widths: Iterable[int], sites: list[KVSite] | None = None) -> str:
    """'768 (text context), 320, 640, 1280' for messages."""
    context = {site.width for site in sites or [] if site.cross}
    ordered = sorted(set(widths), key=lambda w: (w not in context, w))
    return ", ".join(f"{w} (text context)" if w in context else str(w) for w in ordered)
