"""Where a hypernetwork attaches: every attention layer's k and v projections in the UNet.

A1111 runs the context of every attention layer through the hypernetwork modules of the context's
width: cross-attention (attn2) reads the text context, self-attention (attn1) its own features.
`find_kv_sites` lists those layers' `to_k` / `to_v` Linears with the width they read, found
through the model's module map (`DiffusionModel.module_map()`), so the same code finds them in our
standalone model, in A1111's ldm/sgm UNet and in Forge's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lib_training.model.diffusion import DiffusionModel
from lib_training.model.hooks import ModuleHooks


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


class Attachment:
    """One hypernetwork's modules on one model's k/v projections, at one strength.

    Every site runs `to_k(x + mlp_k(x) * strength)` (v alike). The text context is the same tensor
    for every cross-attention layer of one UNet call, so the (k, v) modules of its width run on it
    once per call, when the UNet is entered, and each cross-attention layer reuses that result (A1111
    runs them again in every layer: the same numbers, 16 times the work in SD1). Not while dropout
    trains: each layer then draws its own mask. The result is kept until the next call, so that
    gradient checkpointing, which reruns layers in the backward pass, finds it too.
    """

    def __init__(
        self,
        modules: Mapping[int, tuple[nn.Module, nn.Module]],
        strength: float,
        dropout_seed: Callable[[int, str], int | None],
        has_dropout: bool,
    ) -> None:
        self.modules = modules
        self.strength = strength
        self.dropout_seed = dropout_seed  # (site index, "k" or "v") -> seed of the masks, None in eval mode
        self.has_dropout = has_dropout
        self._shared: tuple[Tensor, Tensor, Tensor] | None = None  # (context, its k input, its v input)

    def install(self, hooks: ModuleHooks, model: DiffusionModel, sites: list[KVSite]) -> None:
        hooks.wrap_forward(model.modules["unet"], self._unet_call)
        for index, site in enumerate(sites):
            pair = self.modules.get(site.width)
            if pair is not None:
                hooks.transform_input(site.to_k, self._transform(pair[0], index, "k", site.cross))
                hooks.transform_input(site.to_v, self._transform(pair[1], index, "v", site.cross))

    def clear(self) -> None:
        self._shared = None

    def _unet_call(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        self._shared = None
        pair = self.modules.get(context.shape[-1]) if isinstance(context, Tensor) and context.dim() == 3 else None
        if pair is not None and not (self.has_dropout and pair[0].training):
            k = pair[0](context.float(), self.strength).to(context.dtype)  # [B, M, width]
            v = pair[1](context.float(), self.strength).to(context.dtype)
            self._shared = (context, k, v)
        return forward(*args, **kwargs)

    def _transform(self, module: nn.Module, index: int, part: str, cross: bool) -> Callable[[Tensor], Tensor]:
        position = 1 if part == "k" else 2

        def transform(x: Tensor) -> Tensor:  # x [B, M, width]: the context (or features) k or v reads
            shared = self._shared
            if cross and shared is not None and x is shared[0]:
                return shared[position]
            seed = self.dropout_seed(index, part) if module.training else None
            return module(x.float(), self.strength, seed).to(x.dtype)

        return transform
