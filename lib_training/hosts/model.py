"""A `DiffusionModel` built from a host's loaded model, valid inside the session that built it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from lib_training.model.diffusion import DiffusionModel, OffloadPart


@dataclass
class HostDiffusionModel(DiffusionModel):
    """`set_gradient_checkpointing` goes to the session, which installs it on the host's blocks; a host
    that places models itself (Forge) offloads parts through `offloading`."""

    checkpointing: Callable[[bool], None] | None = None
    offloading: Callable[[OffloadPart], contextlib.AbstractContextManager[None]] | None = None

    def set_gradient_checkpointing(self, enabled: bool, fraction: float = 1.0) -> None:
        if self.checkpointing is None:
            super().set_gradient_checkpointing(enabled, fraction)
        else:
            self.checkpointing(enabled)  # a host's blocks: all of them (a fraction applies to our UNet)

    def offloaded(self, part: OffloadPart) -> contextlib.AbstractContextManager[None]:
        if self.offloading is None:
            return super().offloaded(part)
        return self.offloading(part)
