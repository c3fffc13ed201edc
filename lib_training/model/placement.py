"""Where a model's parts are: moving modules off the GPU for a while, and back exactly where they were."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

OFFLOAD_DEVICE = torch.device("cpu")


def module_device(module: nn.Module | None) -> torch.device | None:
    """The device of the module's first parameter (None for no module, or one without parameters)."""
    if module is None:
        return None
    param = next(module.parameters(), None)
    return None if param is None else param.device


@contextmanager
def moved_to(modules: Iterable[nn.Module], device: torch.device = OFFLOAD_DEVICE) -> Iterator[None]:
    """`modules` on `device` inside the block; on exit each is back on the device it was on.

    Parameter objects stay the same (only their data moves), so optimizers and hooks keep their
    references. A module already on `device` is not touched. GPU memory freed is returned to the
    caching allocator's pool for the block's own use.
    """
    places = [(module, module_device(module)) for module in dict.fromkeys(modules)]
    moved = [(module, place) for module, place in places if place is not None and place != device]
    try:
        for module, _ in moved:
            module.to(device)
        yield
    finally:
        for module, place in moved:
            module.to(place)
