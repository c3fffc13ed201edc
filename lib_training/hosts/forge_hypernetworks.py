"""Hypernetworks in Forge's txt2img / img2img: `<hypernet:NAME:STRENGTH>` applied through Forge's attention patches.

Forge still parses the tag (its `hypernet` extra network loads the file) but never applies it: every
place that did is commented out. Here the tag works again, with A1111's meaning:

- **The tag.** Our `HypernetTag` takes the place of Forge's `hypernet` extra network in
  `modules.extra_networks` (registered in `on_before_ui`, as extensions register theirs; Forge's own
  goes back in `on_script_unloaded`). Its `activate` only notes which files and strengths the current
  stage asks for (the first pass's tags, then hires fix's), with Forge's "Add hypernetwork to prompt"
  setting honoured as Forge does; nothing is loaded twice and nothing is left unconsumed.
- **The patch.** Before every sampling (`process_before_every_sampling`: Forge has just reset
  `p.sd_model.forge_objects` from `forge_objects_after_applying_lora`), the UNet patcher there is
  *cloned* and the clone gets one `HypernetworkPatch` per file as an `attn1_patch` and an
  `attn2_patch` (`set_model_attn1_patch` / `set_model_attn2_patch`). Forge calls those before
  `to_k(context)` / `to_v(value)` of every self- and cross-attention with `(n, context, value,
  extra_options)`; the patch returns `(n, mlp_k(context), mlp_v(value))` for the context's width,
  `x + mlp(x) * strength` in fp32 (`HypernetworkModule`, the same numbers as our own attachment).
  Several files chain in prompt order, k and v separately, as A1111 chains them. The text context is
  one tensor for all cross-attention layers of a UNet call, so its (k, v) inputs are computed once
  per call and reused (A1111 recomputes them in each layer: the same numbers).
- **Nothing changes for good.** The loaded model's patchers (`forge_objects_original`,
  `forge_objects_after_applying_lora`) and their `model_options` are never touched; the clone lives in
  the per-sampling copy of `forge_objects`, and the script's `postprocess` puts the patcher it was
  cloned from back there. No weight or module of the model is changed or hooked.

A file whose widths match none of the model's attention layers (an SDXL file on SD1) is reported
with the widths the model has, as Forge reports a failing extra network, and the generation goes on
without it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lib_training.errors import UserError
from lib_training.formats.hypernetwork_file import read_hypernetwork
from lib_training.methods.hypernetwork import modules_from_file
from lib_training.methods.hypernetwork_attach import KVSite, find_kv_sites, widths_text
from lib_training.methods.hypernetwork_net import HypernetworkModule

TAG = "hypernet"
REQUESTED = "sdwt_hypernetworks"  # attribute of `p`: the [(name, strength)] the current stage asks for
Pairs = Mapping[int, tuple[HypernetworkModule, HypernetworkModule]]  # width -> (k module, v module)


class HypernetworkPatch:
    """One hypernetwork at one strength as a Forge attention patch.

    As an attn2 patch (`reuse=True`) it sees the same text context tensor in every cross-attention
    layer of one UNet call: the (k, v) result for it is kept and returned while the same tensors come
    again (A1111 recomputes it in each layer: the same numbers). Self-attention inputs differ per layer.
    """

    def __init__(self, name: str, modules: Pairs, strength: float, reuse: bool = False) -> None:
        self.name = name
        self.modules = modules
        self.strength = strength
        self.reuse = reuse
        self.device = next(iter(modules.values()))[0].linear[0].weight.device
        self._kept: tuple[Tensor, Tensor | None, Tensor, Tensor] | None = None  # (context, value, k in, v in)

    def __call__(self, n: Tensor, context: Tensor, value: Tensor | None, extra_options: dict) -> tuple:
        """n [B, N, C]: the queries' input; context, value [B, M, width]: what to_k and to_v will read."""
        kept = self._kept
        if kept is not None and kept[0] is context and kept[1] is value:
            return n, kept[2], kept[3]
        pair = self.modules.get(context.shape[-1])
        if pair is None:
            return n, context, value
        if context.device != self.device:
            self.to(context.device)
        k = self._run(pair[0], context)
        v = self._run(pair[1], context if value is None else value)
        if self.reuse:
            self._kept = (context, value, k, v)
        return n, k, v

    def _run(self, module: nn.Module, x: Tensor) -> Tensor:
        return module(x.float(), self.strength).to(x.dtype)  # fp32 inside, as A1111 and our attachment

    def to(self, target: Any) -> HypernetworkPatch:
        """Forge's `model_patches_to`: moves patches with the UNet (a device), then casts them to the
        UNet's dtype; the modules follow the device and stay fp32."""
        if isinstance(target, (torch.device, str)):
            self.device = torch.device(target)
            self._kept = None
            for pair in self.modules.values():
                for module in pair:
                    module.to(self.device)
        return self

    def __deepcopy__(self, memo: dict) -> HypernetworkPatch:
        # `UnetPatcher.clone()` deep-copies model_options: a later clone (another extension's) shares
        # the modules instead of copying the weights; the patch never changes after it is made.
        return self


@dataclass
class _Loaded:
    stamp: tuple[int, int, int]  # (mtime_ns, size, inode) of the file when read: a rewrite changes one
    modules: Pairs


class ForgeHypernetworks:
    """The state of hypernetworks in one Forge process: files read, the patch of the last sampling."""

    def __init__(self) -> None:
        self._files: dict[str, _Loaded] = {}
        self._sites: tuple[weakref.ref, list[KVSite]] | None = None  # (the UNet, its k/v sites)
        self._last: tuple[Any, Any, Any] | None = None  # (forge_objects, the patcher cloned, our clone)
        self._replaced: Any = None  # Forge's own `hypernet` extra network, while ours is registered
        self.tag = HypernetTag()

    # --- the extra network -------------------------------------------------------------------------
    def register(self) -> None:
        """`on_before_ui`: ours in place of Forge's `hypernet` extra network."""
        from modules import extra_networks

        current = extra_networks.extra_network_registry.get(TAG)
        if current is not self.tag:
            self._replaced = current
            extra_networks.register_extra_network(self.tag)

    def unregister(self) -> None:
        """`on_script_unloaded`: Forge's own back (if ours is still the one registered)."""
        from modules import extra_networks

        registry = extra_networks.extra_network_registry
        if registry.get(TAG) is self.tag:
            if self._replaced is not None:
                registry[TAG] = self._replaced
            else:
                del registry[TAG]
        self._replaced = None

    # --- a generation ------------------------------------------------------------------------------
    def before_sampling(self, p: Any) -> None:
        """`process_before_every_sampling`: the hypernetworks this stage asks for on a clone of the UNet
        patcher of this sampling (see the module docstring)."""
        requested = [(name, strength) for name, strength in getattr(p, REQUESTED, None) or () if strength != 0]
        if not requested or getattr(p.sd_model, "forge_objects", None) is None:
            return
        objects = p.sd_model.forge_objects
        sites = self._kv_sites(p.sd_model)
        patches, problems, used = [], [], set()
        for name, strength in requested:
            try:
                path = _path_of(name)
                used.add(str(path))
                patches.append(HypernetworkPatch(name, self._modules(name, path, sites), strength))
            except (UserError, OSError) as error:
                problems.append(str(error))
        for path in set(self._files) - used:
            del self._files[path]  # keep the files of this generation only
        if patches:
            before = objects.unet
            objects.unet = patched_unet(before, patches, sites)
            self._last = (objects, before, objects.unet)
        if problems:
            raise UserError("; ".join(problems))  # reported by Forge; the others are applied

    def after_generation(self, p: Any = None) -> None:
        """The script's `postprocess`: the patcher of the last sampling back where our clone was."""
        if self._last is not None:
            objects, before, ours = self._last
            if objects.unet is ours:
                objects.unet = before
        self._last = None
        if p is not None and hasattr(p, REQUESTED):
            delattr(p, REQUESTED)

    def _kv_sites(self, sd_model: Any) -> list[KVSite]:
        diffusion_model = sd_model.forge_objects.unet.model.diffusion_model
        if self._sites is None or self._sites[0]() is not diffusion_model:
            self._sites = (weakref.ref(diffusion_model), find_kv_sites(_UNetMap(sd_model)))  # type: ignore[arg-type]
        return self._sites[1]

    def _modules(self, name: str, path: Path, sites: list[KVSite]) -> Pairs:
        info = os.stat(path)
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        loaded = self._files.get(str(path))
        if loaded is None or loaded.stamp != stamp:
            _, modules = modules_from_file(read_hypernetwork(path))
            loaded = self._files[str(path)] = _Loaded(stamp, modules)
        present = {site.width for site in sites}
        if not present & set(loaded.modules):
            raise UserError(
                f"the hypernetwork {name!r} has modules for widths {widths_text(loaded.modules)}, but this model's "
                f"attention reads {widths_text(present, sites)}: it was made for another model family"
            )
        return loaded.modules


class HypernetTag:
    """Forge's `hypernet` extra network, for `modules.extra_networks` (name, activate, deactivate)."""

    name = TAG

    def activate(self, p: Any, params_list: list[Any]) -> None:
        """Note on `p` the (name, strength) pairs of this stage's tags, in prompt order; an unknown
        name or a bad strength is reported after the others are noted."""
        from modules import extra_networks, shared

        params_list = list(params_list)
        extra = getattr(shared.opts, "sd_hypernetwork", "None")
        if extra != "None" and extra in shared.hypernetworks and not any(x.items[0] == extra for x in params_list):
            multiplier = shared.opts.extra_networks_default_multiplier
            p.all_prompts = [f"{prompt}<{TAG}:{extra}:{multiplier}>" for prompt in p.all_prompts]
            params_list.append(extra_networks.ExtraNetworkParams(items=[extra, multiplier]))
        requested, problems = [], []
        for params in params_list:
            name = str(params.items[0])
            try:
                strength = float(params.items[1]) if len(params.items) > 1 else 1.0
            except ValueError:
                problems.append(f"the strength in <{TAG}:{':'.join(map(str, params.items))}> is not a number")
                continue
            if name not in shared.hypernetworks:
                shared.reload_hypernetworks()  # a file written since the list was read
            if name not in shared.hypernetworks:
                problems.append(f"there is no hypernetwork named {name!r} in {shared.cmd_opts.hypernetwork_dir}")
                continue
            requested.append((name, strength))
        setattr(p, REQUESTED, requested)
        if problems:
            raise UserError("; ".join(problems))

    def deactivate(self, p: Any) -> None:
        pass  # the patch goes with the per-sampling copy of forge_objects; postprocess tidies


def patched_unet(unet: Any, patches: Sequence[HypernetworkPatch], sites: list[KVSite]) -> Any:
    """A clone of the UNet patcher `unet` with `patches` as attention patches, in order: attn2 (text
    context) when a patch has a module for a cross-attention width, attn1 when for a self-attention one."""
    cross = {site.width for site in sites if site.cross}
    features = {site.width for site in sites if not site.cross}
    clone = unet.clone()
    for patch in patches:
        if cross & set(patch.modules):
            clone.set_model_attn2_patch(HypernetworkPatch(patch.name, patch.modules, patch.strength, reuse=True))
        if features & set(patch.modules):
            clone.set_model_attn1_patch(patch)
    return clone


def _path_of(name: str) -> Path:
    from modules import shared

    path = shared.hypernetworks.get(name)
    if path is None:
        raise UserError(f"there is no hypernetwork named {name!r} in {shared.cmd_opts.hypernetwork_dir}")
    return Path(path)


class _UNetMap:
    """The module map of Forge's UNet alone (LDM names), for `find_kv_sites`."""

    def __init__(self, sd_model: Any) -> None:
        self.sd_model = sd_model

    def module_map(self) -> Any:
        from lib_training.hosts.forge import model_arch, module_roots
        from lib_training.model.module_map import build_module_map

        unet = [root for root in module_roots(self.sd_model) if root.component == "unet"]
        return build_module_map(model_arch(self.sd_model), unet)


hypernetworks = ForgeHypernetworks()
