"""Fingerprints of a model's weights and hooks, to prove that training left it as it was."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn


@torch.no_grad()
def weights_fingerprint(modules: Mapping[str, nn.Module]) -> str:
    """sha256 over every parameter and buffer: names, dtypes, shapes and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for prefix in sorted(modules):
        state = modules[prefix].state_dict(keep_vars=False)
        for name in sorted(state):
            tensor = state[name]
            digest.update(f"{prefix}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            if tensor.device.type != "meta" and tensor.numel():
                data = tensor.detach().reshape(-1).contiguous().cpu()  # 0-d tensors cannot be viewed as bytes
                digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hooks_snapshot(modules: Mapping[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """Per submodule with hooks or a patched forward: the counts of each kind of hook.

    A module whose `forward` or `_forward` was replaced on the instance counts as patched.
    """
    snapshot: dict[str, tuple[int, ...]] = {}
    for prefix, root in modules.items():
        for name, module in root.named_modules():
            counts = (
                len(module._forward_hooks),
                len(module._forward_pre_hooks),
                len(module._backward_hooks),
                len(getattr(module, "_backward_pre_hooks", {})),
                int("forward" in module.__dict__),
                int("_forward" in module.__dict__),
            )
            if any(counts):
                snapshot[f"{prefix}.{name}"] = counts
    return snapshot


def requires_grad_snapshot(modules: Mapping[str, nn.Module]) -> frozenset[str]:
    """Names of parameters that require grad (a frozen model has none)."""
    return frozenset(
        f"{prefix}.{name}" for prefix, root in modules.items() for name, p in root.named_parameters() if p.requires_grad
    )
