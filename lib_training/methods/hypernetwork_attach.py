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

import torch
from torch import Tensor, nn

from lib_training.methods.hypernetwork_net import HypernetworkModule, affine_form
from lib_training.model.diffusion import DiffusionModel
from lib_training.model.hooks import ModuleHooks
from lib_training.model.layers import is_linear


@dataclass(frozen=True)
class KVSite:
    """One attention layer's k and v projections."""

    name: str  # module path in the UNet, e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    to_k: nn.Module  # a Linear (see model.layers.is_linear)
    to_v: nn.Module
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
        if not (is_linear(key_entry.module) and is_linear(value_entry.module)):
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

    Every site runs `to_k(x + mlp_k(x) * strength)` (v alike), computed as cheaply as the formula allows:

    - The text context is the same tensor for every cross-attention layer of one UNet call, so the
      (k, v) modules of its width run on it once, when the UNet is entered, and each cross-attention
      layer takes that result (A1111 runs them again in every layer: the same numbers, 16 times the
      work in SD1). The result is kept until the next UNet call, so that gradient checkpointing, which
      reruns layers in the backward pass, finds it too. Without gradients (generation) the next call
      reuses it when it gets the same context tensor, unchanged (same version), and the modules'
      weights are unchanged: a sampler passes one context to every step, so the modules run once per
      image. A new prompt is a new tensor and is computed afresh; `clear()` (detach, the end of
      `apply_for_generation`) drops it.
    - Not while dropout trains: each layer then draws its own masks.
    - Self-attention reads its own features, different in every layer: its modules run there. An
      affine module (activation 'linear', no layer norm: A1111's default) is one matrix without
      autograd: `x @ a + c` (`affine_form`, kept while the weights are unchanged), one width x width
      matmul in place of the stack's (a quarter of the work for '1, 2, 1').
    - At strength 0 (not training) the input passes through untouched.
    """

    def __init__(
        self,
        modules: Mapping[int, tuple[HypernetworkModule, HypernetworkModule]],
        strength: float,
        dropout_seed: Callable[[int, str], int | None],
        has_dropout: bool,
    ) -> None:
        self.modules = modules
        self.strength = strength
        self.dropout_seed = dropout_seed  # (site index, "k" or "v") -> seed of the masks, None in eval mode
        self.has_dropout = has_dropout
        self._shared: _Computed | None = None  # the text context's k and v inputs
        self._affine_maps: dict[nn.Module, tuple[tuple[int, ...], tuple[Tensor, Tensor] | None]] = {}

    def install(self, hooks: ModuleHooks, model: DiffusionModel, sites: list[KVSite]) -> None:
        hooks.wrap_forward(model.modules["unet"], self._unet_call)
        for index, site in enumerate(sites):
            pair = self.modules.get(site.width)
            if pair is not None:
                hooks.transform_input(site.to_k, self._transform(pair, index, 0, site.cross))
                hooks.transform_input(site.to_v, self._transform(pair, index, 1, site.cross))

    def clear(self) -> None:
        """Forget the context's computed inputs and the modules' affine maps."""
        self._shared = None
        self._affine_maps.clear()

    def _affine(self, module: HypernetworkModule) -> tuple[Tensor, Tensor] | None:
        """The module as one affine map (`affine_form`), kept while its weights are unchanged."""
        version = _weights_version((module,))
        if version is None:
            return affine_form(module, self.strength)
        kept = self._affine_maps.get(module)
        if kept is None or kept[0] != version:
            kept = self._affine_maps[module] = (version, affine_form(module, self.strength))
        return kept[1]

    def _passes_through(self, module: nn.Module) -> bool:
        return self.strength == 0 and not module.training  # training runs at strength 1

    def _unet_call(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        pair = self.modules.get(context.shape[-1]) if isinstance(context, Tensor) and context.dim() == 3 else None
        if pair is None or (self.has_dropout and pair[0].training) or self._passes_through(pair[0]):
            self._shared = None
        # In training, computed afresh without looking at `_shared` (torch.compile would guard on it).
        elif not (_without_autograd(pair) and self._shared is not None and self._shared.reusable_for(context, pair)):
            self._shared = _Computed.of(pair, context, self.strength)  # [B, M, width] each
        return forward(*args, **kwargs)

    def _transform(
        self, pair: tuple[HypernetworkModule, HypernetworkModule], index: int, part: int, cross: bool
    ) -> Callable[[Tensor], Tensor]:
        module = pair[part]

        def transform(x: Tensor) -> Tensor:  # x [B, M, width]: the context (or features) k or v reads
            shared = self._shared
            if cross and shared is not None and shared.holds(x):
                return shared.inputs[part]
            if self._passes_through(module):
                return x
            if not cross and _without_autograd(pair):
                affine = self._affine(module)
                if affine is not None:  # x @ a + c: one matmul of width x width instead of the stack's
                    flat = x.float().reshape(-1, x.shape[-1])  # [B * M, width]
                    return torch.addmm(affine[1], flat, affine[0]).view(x.shape).to(x.dtype)
            seed = self.dropout_seed(index, "kv"[part]) if self.has_dropout and module.training else None
            return module(x.float(), self.strength, seed).to(x.dtype)  # A1111's fp32 (no copy for fp32)

        return transform


@dataclass(frozen=True, eq=False)
class _Computed:
    """The k and v inputs that a module pair made of one tensor, with what they depend on."""

    source: Tensor  # [B, M, width]
    version: int | None  # the source's version counter (None: an inference tensor, or not reusable)
    weights: tuple[int, ...] | None  # the modules' parameters' version counters (None: inference tensors)
    inputs: tuple[Tensor, Tensor]  # x + mlp_k(x) * strength, x + mlp_v(x) * strength; [B, M, width] each
    reusable: bool  # made without autograd and dropout: valid as long as source and weights are unchanged

    @classmethod
    def of(cls, pair: tuple[HypernetworkModule, HypernetworkModule], x: Tensor, strength: float) -> _Computed:
        # A1111 runs the modules in fp32 and casts back (no copies when x is fp32)
        k, v = pair[0](x.float(), strength), pair[1](x.float(), strength)
        inputs = (k.to(x.dtype), v.to(x.dtype))
        if not _without_autograd(pair):  # training: used within this UNet call only, so no version counters
            return cls(x, None, None, inputs, reusable=False)  # (which torch.compile cannot read either)
        weights = _weights_version(pair)
        reusable = _version(x) is not None and weights is not None
        return cls(x, _version(x), weights, inputs, reusable)

    def holds(self, x: Tensor) -> bool:
        """Whether these are the inputs for `x`: the very tensor, not changed in place since (where a
        version counter was kept)."""
        return x is self.source and (self.version is None or _version(x) == self.version)

    def reusable_for(self, x: Tensor, pair: tuple[HypernetworkModule, HypernetworkModule]) -> bool:
        """Whether a later UNet call may take these for `x`: both without autograd, the same tensor
        unchanged, the modules' weights unchanged."""
        return self.reusable and _without_autograd(pair) and self.holds(x) and _weights_version(pair) == self.weights


def _without_autograd(pair: tuple[nn.Module, nn.Module]) -> bool:
    return not (torch.is_grad_enabled() or pair[0].training)


def _version(x: Tensor) -> int | None:
    return None if x.is_inference() else x._version


def _weights_version(modules: tuple[nn.Module, ...]) -> tuple[int, ...] | None:
    """The parameters' version counters; None if one is an inference tensor (it keeps none), so
    nothing computed from them is kept."""
    params = [p for module in modules for p in module.parameters()]
    return None if any(p.is_inference() for p in params) else tuple(p._version for p in params)
