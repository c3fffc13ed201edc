"""Where a hypernetwork attaches: every attention layer's k and v projections in the UNet.

A1111 runs the context of every attention layer through the hypernetwork modules of the context's
width: cross-attention (attn2) reads the text context, self-attention (attn1) its own features.
`find_kv_sites` lists those layers' `to_k` / `to_v` Linears with the width they read, in module
order, on any UNet whose attention layers hold `to_k` and `to_v` Linears (ours, LDM/sgm's in A1111,
ComfyUI's in Forge).
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
    """Every attention layer of the UNet with Linear `to_k` and `to_v` of one input width."""
    unet = model.modules.get("unet")
    if unet is None:
        raise ValueError("the model has no 'unet' module")
    sites = []
    for name, module in unet.named_modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if not (isinstance(to_k, nn.Linear) and isinstance(to_v, nn.Linear)):
            continue
        if to_k.in_features != to_v.in_features:
            continue  # not an attention layer that reads one context
        sites.append(KVSite(name, to_k, to_v, to_k.in_features, name.rsplit(".", 1)[-1] == "attn2"))
    if not sites:
        raise ValueError("no attention layers with to_k / to_v projections were found in the UNet")
    return sites


def widths_text(widths: Iterable[int], sites: list[KVSite] | None = None) -> str:
    """'768 (text context), 320, 640, 1280' for messages."""
    context = {site.width for site in sites or [] if site.cross}
    ordered = sorted(set(widths), key=lambda w: (w not in context, w))
    return ", ".join(f"{w} (text context)" if w in context else str(w) for w in ordered)
