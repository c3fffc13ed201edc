"""Temporary changes to module instances, every one undone by `clear()`.

A method that trains through a model's modules (LoRA adds to a layer's output, a hypernetwork
transforms the context a k/v projection sees) never edits a module's class or weights: it sets a
`forward` on the instance, which `nn.Module.__call__` finds before the class's, and takes it off
again. Hooks stack: a second wrapper of the same module wraps the first, and `clear()` undoes them
in reverse order, so the module ends exactly as it began (an instance attribute that was there
before, such as a host's own override, comes back as the same object).

    hooks = ModuleHooks()
    try:
        hooks.add_to_output(linear, lambda x: lora_up(lora_down(x)) * scale)
        ...
    finally:
        hooks.clear()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

_MISSING = object()


class ModuleHooks:
    """Attributes set on module instances (a replacement `forward`, say), all removed by `clear`."""

    def __init__(self) -> None:
        self._installed: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, what was there)

    def install(self, module: nn.Module, name: str, value: Any) -> None:
        """Set `module.<name>` on the instance; refuses to replace an instance attribute already there."""
        if name in module.__dict__:
            raise RuntimeError(f"{type(module).__name__} already has an instance attribute {name!r}")
        self._set(module, name, value)

    def wrap_forward(self, module: nn.Module, wrapper: Callable[..., Any]) -> None:
        """`module(...)` becomes `wrapper(forward, ...)`, where `forward` is what it called before
        (stacks on earlier wrappers and on a host's own instance override)."""
        inner = module.forward  # the instance's override if any, else the class's bound forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return wrapper(inner, *args, **kwargs)

        self._set(module, "forward", forward)

    def add_to_output(self, module: nn.Module, extra: Callable[[Tensor], Tensor]) -> None:
        """`module(x)` becomes `module(x) + extra(x)` (a residual on the output: LoRA)."""
        self.wrap_forward(module, lambda forward, x, *args, **kwargs: forward(x, *args, **kwargs) + extra(x))

    def transform_input(self, module: nn.Module, transform: Callable[[Tensor], Tensor]) -> None:
        """`module(x)` becomes `module(transform(x))` (a hypernetwork on the context of k or v)."""
        self.wrap_forward(module, lambda forward, x, *args, **kwargs: forward(transform(x), *args, **kwargs))

    def _set(self, module: nn.Module, name: str, value: Any) -> None:
        self._installed.append((module, name, module.__dict__.get(name, _MISSING)))
        object.__setattr__(module, name, value)

    def clear(self) -> None:
        """Undo everything, newest first."""
        while self._installed:
            module, name, before = self._installed.pop()
            if before is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, before)

    def __len__(self) -> int:
        return len(self._installed)

    @contextmanager
    def applied(self) -> Iterator[ModuleHooks]:
        """Yields the hooks; clears them on exit, whatever happens."""
        try:
            yield self
        finally:
            self.clear()
