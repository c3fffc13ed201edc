"""Optimizers by name, and gradient clipping by value or by norm.

`adamw` is PyTorch's AdamW, fused into one kernel when every parameter is a floating-point CUDA
tensor. `adamw8bit` (bitsandbytes) and `prodigy` (prodigyopt) are used when their package is
installed. Prodigy estimates its own step size: its lr is a multiplier on that estimate, so give it
1.0 (and let a schedule scale it), not the small rates that AdamW needs.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lib_training.errors import ConfigError

OPTIMIZER_NAMES = ("adamw", "adamw8bit", "prodigy")
CLIP_MODES = ("value", "norm")

# optimizer name -> (module to import, package to pip install)
_PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


def available_optimizers() -> tuple[str, ...]:
    """The names in OPTIMIZER_NAMES whose package can be imported here (for UI choices)."""
    names = []
    for name in OPTIMIZER_NAMES:
        if name in _PACKAGES:
            try:
                importlib.import_module(_PACKAGES[name][0])
            except Exception:  # missing, or installed but broken (e.g. no CUDA libraries)
                continue
        names.append(name)
    return tuple(names)


def build_optimizer(
    name: str,
    params: Params,
    lr: float,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    extra: Mapping[str, Any] | None = None,
) -> Optimizer:
    """The optimizer `name` (one of OPTIMIZER_NAMES) over `params` (tensors or param-group dicts).

    `extra` passes further keyword arguments to the optimizer's constructor (for example
    Prodigy's `d_coef` or `safeguard_warmup`). Raises ConfigError for an unknown name or a
    missing package, saying what to install.
    """
    key = name.strip().lower()
    if key not in OPTIMIZER_NAMES:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    params = list(params)
    if not params:
        raise ValueError("the optimizer got no parameters to train")
    options: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    options.update(extra or {})
    if key == "adamw":
        if "fused" not in options and "foreach" not in options and _can_fuse(params):
            options["fused"] = True
        return torch.optim.AdamW(params, **options)
    module = _import_package(key)
    if key == "adamw8bit":
        return module.optim.AdamW8bit(params, **options)
    return module.Prodigy(params, **options)


def _can_fuse(params: list[Any]) -> bool:
    """Whether AdamW can run fused: torch knows `fused` and every parameter is a CUDA float tensor."""
    if "fused" not in inspect.signature(torch.optim.AdamW.__init__).parameters:
        return False
    tensors: list[Tensor] = []
    for item in params:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    return all(t.is_cuda and t.is_floating_point() for t in tensors)


def _import_package(optimizer: str) -> Any:
    module_name, package = _PACKAGES[optimizer]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"the {optimizer} optimizer needs the package {package}, which is not installed. Install it into "
            f"the Python environment that runs the training with `pip install {package}`, or choose adamw."
        ) from None
    except Exception as error:  # bitsandbytes fails this way without usable CUDA libraries
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"the {optimizer} optimizer needs {package}, which is installed but failed to load "
            f"({first_line}). Reinstall it for this GPU and CUDA version, or choose adamw."
        ) from error


def clip_gradients(params: Iterable[Tensor], mode: str | None, limit: float | None) -> Tensor:
    """Clip the gradients of `params` in place; return their total L2 norm from before clipping.

    mode "value" clamps every gradient element to [-limit, limit]; "norm" rescales all gradients
    together so that their total L2 norm is at most `limit`; None (or "none") leaves them alone.
    With a loss scaler, unscale the gradients first. The norm is a 0-dim float32 tensor on the
    gradients' device (call `.item()` to log it; that waits for the GPU); 0 when there are none.
    """
    with_grad = [p for p in params if p.grad is not None]
    if mode in (None, "none"):
        return _total_norm(with_grad)
    if mode not in CLIP_MODES:
        raise ConfigError(f"unknown gradient clipping mode {mode!r}; choose none, {' or '.join(CLIP_MODES)}")
    if limit is None or not limit > 0:
        raise ConfigError(f"gradient clipping by {mode} needs a limit greater than 0 (got {limit})")
    if mode == "norm":
        if not with_grad:
            return torch.zeros((), dtype=torch.float32)
        return torch.nn.utils.clip_grad_norm_(with_grad, float(limit)).float()
    norm = _total_norm(with_grad)
    torch.nn.utils.clip_grad_value_(with_grad, float(limit))
    return norm


def _total_norm(params: list[Tensor]) -> Tensor:
    if not params:
        return torch.zeros((), dtype=torch.float32)
    device = params[0].grad.device
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).to(device) for p in params]
    return torch.linalg.vector_norm(torch.stack(norms))


def all_finite(params: Sequence[Tensor]) -> bool:
    """Whether no parameter holds an inf or NaN, with one host sync and a few operators for all of them
    (a per-tensor check costs two operators and a sync per parameter): the largest magnitude of each
    tensor, by torch's foreach norm (grouped kernels on a GPU), is finite exactly when the tensor is."""
    if not params:
        return True
    with torch.no_grad():
        largest = torch._foreach_norm(list(params), math.inf)  # [max |p|] per tensor
        return bool(torch.stack(largest).isfinite().all())
