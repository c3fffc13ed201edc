"""A `DiffusionModel` built from a host's loaded model, valid inside the session that built it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from lib_training.model.diffusion import DiffusionModel


@dataclass
class HostDiffusionModel(DiffusionModel):
    """`set_gradient_checkpointing` goes to the session, which installs it on the host's blocks; a host
    that places models itself (Forge) offloads the text encoders through `text_offload`."""

    checkpointing: Callable[[bool], None] | None = None
    text_offload: Callable[[], contextlib.AbstractContextManager[None]] | None = None

    def set_gradient_checkpointing(self, enabled: bool, fraction: float = 1.0) -> None:
        if self.checkpointing is None:
            super().set_gradient_checkpointing(enabled, fraction)
        else:
            self.checkpointing(enabled)  # a host's blocks: all of them (a fraction applies to our UNet)

    def text_encoders_offloaded(self) -> contextlib.AbstractContextManager[None]:
        if self.text_offload is None:
            return super().text_encoders_offloaded()
        return self.text_offload()
