"""Temporary changes to a host's objects, each undone exactly (same objects, same flags) on exit.

A session stacks these on a `contextlib.ExitStack`, so whatever happens (a finished run, an
interrupt, an exception) they are undone in reverse order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lib_training.formats.fingerprint import hooks_snapshot, requires_grad_snapshot, weights_fingerprint

_MISSING = object()


class AttributeSnapshot:
    """The values of `names` as stored on `target` itself (a class, a module, an object); `restore`
    puts back the very same objects, and deletes what was not there (inherited class attributes)."""

    def __init__(self, target: Any, names: Iterable[str]) -> None:
        self.target = target
        self.saved = {name: vars(target).get(name, _MISSING) for name in names}

    def restore(self) -> None:
        for name, value in self.saved.items():
            if value is _MISSING:
                if name in vars(self.target):
                    delattr(self.target, name)
            elif vars(self.target).get(name, _MISSING) is not value:
                setattr(self.target, name, value)


@contextlib.contextmanager
def frozen(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """No parameter requires grad inside; each gets its own flag back on exit."""
    flags = [(p, p.requires_grad) for p in dict.fromkeys(parameters)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                with torch.inference_mode(p.is_inference()):  # inference tensors change flags only in there
                    p.requires_grad_(flag)


@contextlib.contextmanager
def trainable_parameters(modules: Iterable[nn.Module]) -> Iterator[int]:
    """Replace every inference-tensor parameter of `modules` by a normal frozen one, for autograd.

    Tensors created under `torch.inference_mode()` (how Forge loads models) cannot be saved for
    backward, even when frozen. Each is replaced in every slot that held it (a Parameter can be
    registered under two names) by a new `nn.Parameter` over the same memory: a normal tensor set
    to the original's storage, so nothing is copied (an SDXL UNet would otherwise take its size
    again in VRAM or RAM). On exit the originals come back into their slots; where a memory manager
    moved the replacement to another device meanwhile, the original takes its values there. Yields
    how many parameters were replaced.
    """
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    originals: dict[int, nn.Parameter] = {}
    for root in modules:
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is not None and param.is_inference():
                    slots.setdefault(id(param), []).append((module, name))
                    originals[id(param)] = param
    try:
        for key, original in originals.items():
            replacement = nn.Parameter(_normal_alias(original), requires_grad=False)
            for module, name in slots[key]:
                module._parameters[name] = replacement
        yield len(originals)
    finally:
        for key, original in originals.items():
            module, name = slots[key][0]
            current = module._parameters[name]
            if current is not original and current.data_ptr() != original.data_ptr():
                with torch.inference_mode():
                    original.data = current.detach().to(current.device, copy=True)
            for module, name in slots[key]:
                module._parameters[name] = original


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (not inference) tensor viewing `tensor`'s memory; outside inference mode, a tensor
    set to a storage is normal whoever created the storage."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


class HostModelChangedError(RuntimeError):
    """A session left the host's model different from how it found it (a bug: please report it)."""


@contextlib.contextmanager
def verified_unchanged(modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Fingerprint weights, hooks and requires_grad flags of `modules` before and after; if the body
    ended normally and any differs, raise `HostModelChangedError` naming what changed."""

    def take() -> tuple[str, dict[str, tuple[int, ...]], frozenset[str]]:
        return weights_fingerprint(modules), hooks_snapshot(modules), requires_grad_snapshot(modules)

    before = take()
    yield
    after = take()
    changed = [what for what, a, b in zip(("weights", "hooks", "requires_grad flags"), before, after) if a != b]
    if changed:
        raise HostModelChangedError(
            f"the WebUI's model was not restored exactly after the job ({', '.join(changed)} changed). "
            "This is a bug in sd-webui-training; restart the WebUI before generating, and please report it."
        )
