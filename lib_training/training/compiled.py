"""The UNet call of a training step through torch.compile, falling back to eager with a message.

What is compiled is a small wrapper function that calls the UNet, never the host's module in place:
the module and its class stay untouched, and dropping the wrapper (the end of a run) drops the
compiled code. Shapes are static (`dynamic=False`), so each bucket shape compiles once, on its
first step, and later steps of that shape reuse it (torch keeps up to `torch._dynamo.config.
recompile_limit` shapes, 8 by default; further shapes run eagerly). Calls without gradients
(previews) always run eagerly.

Where compiling fails (an old torch, no C compiler or Triton, an unsupported operator), the step
runs eagerly from then on and `fallback` holds the reason, also given to `on_fallback`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

COMPILE_SETTINGS = ("auto", "off", "on")
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def use_compile(setting: str, device: torch.device) -> bool:
    """ "on", "off", or "auto": on for CUDA where torch.compile and Triton are available, off on the CPU."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, not {setting!r}")
    if setting == "auto":
        return device.type == "cuda" and hasattr(torch, "compile") and importlib.util.find_spec("triton") is not None
    return setting == "on"


class CompiledUNet:
    """Callable like the UNet (x, timesteps, context, y); see the module docstring."""

    def __init__(
        self,
        unet: Callable[..., Tensor],
        on_fallback: Callable[[str], None] | None = None,
        backend: str = "inductor",
    ) -> None:
        self.unet = unet
        self.fallback = ""  # why compiling failed, once it has
        self._on_fallback = on_fallback
        self._compiled: Callable[..., Tensor] | None = None
        try:
            self._compiled = torch.compile(self._eager, dynamic=False, backend=backend)
        except Exception as error:
            self._fail(error)

    def _eager(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, timesteps, context, y)

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        if self._compiled is None or not torch.is_grad_enabled():
            return self._eager(x, timesteps, context, y)
        try:
            return self._compiled(x, timesteps, context, y)
        except _OUT_OF_MEMORY:
            raise
        except Exception as error:
            self._fail(error)
            return self._eager(x, timesteps, context, y)

    def _fail(self, error: BaseException) -> None:
        root = error  # the innermost cause says what went wrong (dynamo wraps backend errors)
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
            root = inner
        first_line = (str(root).strip().splitlines() or [""])[0][:300]
        self.fallback = (
            f"torch.compile failed ({type(root).__name__}: {first_line}); the UNet runs without compiling "
            "(same results, slower). Set compile to off to skip the attempt."
        )
        self._compiled = None
        if self._on_fallback is not None:
            self._on_fallback(self.fallback)

    def __getattr__(self, name: str) -> Any:  # anything else a caller asks of the UNet
        return getattr(self.unet, name)
