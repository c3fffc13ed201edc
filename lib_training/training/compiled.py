"""The UNet call of a training step through torch.compile, falling back to eager with a message.

What is compiled is a small wrapper function that calls the UNet, never the host's module in place:
the module and its class stay untouched, and dropping the wrapper (the end of a run) drops the
compiled code. Shapes are static (`dynamic=False`), so each bucket shape compiles once, on its
first step, and later steps of that shape reuse it (torch keeps up to `torch._dynamo.config.
recompile_limit` shapes, 8 by default; further shapes run eagerly). Calls without gradients
(previews) always run eagerly.

Where compiling fails (an old torch, no C compiler or Triton, an unsupported operator), the step
runs eagerly from then on and `fallback` holds the reason, also given to `on_fallback`.

The setting "cuda-graphs" compiles with `mode="reduce-overhead"`: inductor records each shape's
forward and backward kernels once as CUDA graphs and replays them, so a step launches a few graphs
instead of thousands of kernels (the launch-bound part of a step on a fast GPU). Graph outputs live
in a memory pool that the next replay overwrites, so the UNet's output is cloned (one small copy)
before it is handed on. Where CUDA graphs cannot work (no CUDA device, torch without
`torch.compiler.cudagraph_mark_step_begin` (< 2.1), no Triton), `compile_plan` falls back to what
"auto" does there, with a message saying why.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

COMPILE_SETTINGS = ("auto", "off", "on", "cuda-graphs")
CUDA_GRAPHS_MODE = "reduce-overhead"  # torch.compile's mode that replays CUDA graphs
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def use_compile(setting: str, device: torch.device) -> bool:
    """Whether the UNet call is compiled at all (see `compile_plan`)."""
    return compile_plan(setting, device).mode is not None


@dataclass(frozen=True)
class CompilePlan:
    """How a run calls its UNet: `mode` None (eager), "default" (torch.compile) or CUDA_GRAPHS_MODE;
    `note` says why the setting asked for more than this run can have ("" when it got what it asked)."""

    mode: str | None
    note: str = ""

    @property
    def label(self) -> str:
        """For the run log: off, on or cuda-graphs."""
        return {None: "off", CUDA_GRAPHS_MODE: "cuda-graphs"}.get(self.mode, "on")


def compile_plan(setting: str, device: torch.device, one_forward_per_backward: bool = True) -> CompilePlan:
    """ "off"; "on"; "auto": on for CUDA where torch.compile and Triton are available, off on the CPU;
    "cuda-graphs": compiled with CUDA graphs where they work, else as "auto" with a note saying why.

    `one_forward_per_backward` is false when a step runs the UNet more than once before its backward
    pass or accumulates gradients over several backward passes: the graph pool would then overwrite
    gradients still being accumulated (pytorch/pytorch#169545), so CUDA graphs are not used.
    """
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, not {setting!r}")
    if setting == "auto":
        available = (
            device.type == "cuda" and hasattr(torch, "compile") and importlib.util.find_spec("triton") is not None
        )
        return CompilePlan("default" if available else None)
    if setting == "cuda-graphs":
        why = cuda_graphs_unavailable(device)
        if not why and not one_forward_per_backward:
            why = "CUDA graphs need one UNet call per backward pass (no gradient accumulation, no class images)"
        if not why:
            return CompilePlan(CUDA_GRAPHS_MODE)
        fallback = compile_plan("auto", device).mode
        runs = "compiled without CUDA graphs" if fallback else "without compiling"
        return CompilePlan(fallback, f"{why}: the UNet runs {runs} (as compile auto does here).")
    return CompilePlan("default" if setting == "on" else None)


def cuda_graphs_unavailable(device: torch.device) -> str:
    """Why CUDA graphs through torch.compile cannot be used on `device` ("" when they can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and this run is on the {device.type.upper()}"
    compiler = getattr(torch, "compiler", None)
    if not hasattr(torch, "compile") or not hasattr(compiler, "cudagraph_mark_step_begin"):
        return f"CUDA graphs through torch.compile need torch 2.1 or newer (this is {torch.__version__})"
    if importlib.util.find_spec("triton") is None:
        return "CUDA graphs through torch.compile need Triton, which is not installed"
    return ""


class CompiledUNet:
    """Callable like the UNet (x, timesteps, context, y); see the module docstring."""

    def __init__(
        self,
        unet: Callable[..., Tensor],
        on_fallback: Callable[[str], None] | None = None,
        backend: str | Callable[..., Any] = "inductor",
        mode: str = "default",
    ) -> None:
        self.unet = unet
        self.mode = mode
        self.fallback = ""  # why compiling failed, once it has
        self._on_fallback = on_fallback
        self._compiled: Callable[..., Tensor] | None = None
        options = {} if mode == "default" else {"mode": mode}
        try:
            self._compiled = torch.compile(self._eager, dynamic=False, backend=backend, **options)
        except Exception as error:
            self._fail(error)

    def _eager(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, timesteps, context, y)

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        if self._compiled is None or not torch.is_grad_enabled():
            return self._eager(x, timesteps, context, y)
        try:
            out = self._compiled(x, timesteps, context, y)
            # A CUDA graph's output is overwritten by its next replay: hand on a copy.
            return out.clone() if self.mode == CUDA_GRAPHS_MODE else out
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
        what = "torch.compile with CUDA graphs" if self.mode == CUDA_GRAPHS_MODE else "torch.compile"
        self.fallback = (
            f"{what} failed ({type(root).__name__}: {first_line}); the UNet runs without compiling "
            "(same results, slower). Set compile to off to skip the attempt."
        )
        self._compiled = None
        if self._on_fallback is not None:
            self._on_fallback(self.fallback)

    def __getattr__(self, name: str) -> Any:  # anything else a caller asks of the UNet
        return getattr(self.unet, name)
