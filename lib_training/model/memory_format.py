"""Channels-last (NHWC) weights for a job, and the models back as they were afterwards.

cuDNN runs convolutions natively in NHWC; with NCHW weights and activations it converts layouts
around every convolution. `channels_last(modules)` stores every 4-d parameter and buffer that is
plainly contiguous in channels-last order for the duration of a `with` block and restores the
original order on exit (values are never changed, only strides; Parameter objects stay the same,
so optimizers and hooks keep their references). Inputs follow with `to_channels_last`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

CHANNELS_LAST_SETTINGS = ("auto", "off", "on")


def use_channels_last(setting: str, device: torch.device) -> bool:
    """ "on", "off", or "auto": on for CUDA (where cuDNN prefers NHWC), off on the CPU."""
    if setting not in CHANNELS_LAST_SETTINGS:
        raise ValueError(f"channels_last must be one of {CHANNELS_LAST_SETTINGS}, not {setting!r}")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def to_channels_last(x: Tensor) -> Tensor:
    """A 4-d activation [B, C, H, W] stored as NHWC (other tensors as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@contextmanager
def channels_last(modules: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Within the block, the 4-d weights of `modules` are channels-last; afterwards as they were."""
    converted: list[Tensor] = []
    if enabled:
        seen: set[int] = set()
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                if id(tensor) in seen or tensor.dim() != 4 or not tensor.is_contiguous():
                    continue  # already NHWC, or strided some other way: left alone
                seen.add(id(tensor))
                if tensor.is_contiguous(memory_format=torch.channels_last):
                    continue  # a 1x1 or otherwise ambiguous layout: both orders are the same bytes
                _set_data(tensor, tensor.data.contiguous(memory_format=torch.channels_last))
                converted.append(tensor)
    try:
        yield
    finally:
        for tensor in converted:
            _set_data(tensor, tensor.data.contiguous())


@torch.no_grad()
def _set_data(tensor: Tensor, data: Tensor) -> None:
    tensor.data = data
