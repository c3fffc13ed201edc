"""Gradient checkpointing whose recomputed forward draws the same random numbers as the first one.

`torch.utils.checkpoint` (preserve_rng_state) replays only the global CPU and CUDA generators. A network
that draws from its own `torch.Generator` (LoRA's dropout masks) registers it here while it trains
(`replaying`); every checkpointed segment then records each registered generator's state as its forward
begins and, when autograd recomputes the segment, draws from that recorded state and afterwards puts the
generator back where it was. The recomputed forward therefore sees the masks of the first forward, and
the generator ends each step where a step without checkpointing leaves it (so a resumed run draws the
same numbers either way).

Every checkpointed block, in our model code and in the WebUI adapters, goes through `checkpoint` here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

_GENERATORS: list[torch.Generator] = []  # registered by `replaying`, in registration order


@contextlib.contextmanager
def replaying(generator: torch.Generator) -> Iterator[None]:
    """While inside, checkpointed segments replay `generator`'s draws in their recomputation."""
    _GENERATORS.append(generator)
    try:
        yield
    finally:
        for index, registered in enumerate(_GENERATORS):
            if registered is generator:
                del _GENERATORS[index]
                break


class _Record:
    """Entered around a segment's first forward: remembers each generator's state at its start."""

    def __init__(self, generators: list[torch.Generator], states: list[Tensor]) -> None:
        self.generators, self.states = generators, states

    def __enter__(self) -> None:
        self.states[:] = [generator.get_state() for generator in self.generators]

    def __exit__(self, *exc: object) -> None:
        return None


class _Replay:
    """Entered around the segment's recomputation: draws from the remembered states, then restores."""

    def __init__(self, generators: list[torch.Generator], states: list[Tensor]) -> None:
        self.generators, self.states = generators, states
        self.current: list[Tensor] = []

    def __enter__(self) -> None:
        self.current = [generator.get_state() for generator in self.generators]
        for generator, state in zip(self.generators, self.states, strict=True):
            generator.set_state(state)

    def __exit__(self, *exc: object) -> None:
        for generator, state in zip(self.generators, self.current, strict=True):
            generator.set_state(state)


def _contexts() -> tuple[Any, Any]:
    generators = list(_GENERATORS)
    if not generators:
        return contextlib.nullcontext(), contextlib.nullcontext()
    states: list[Tensor] = []
    return _Record(generators, states), _Replay(generators, states)


def checkpoint(function: Callable[..., Any], *args: Any, use_reentrant: bool = False, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint(function, *args, **kwargs)` (non-reentrant), replaying the
    registered generators as well as the global ones in the recomputation."""
    if use_reentrant:
        raise ValueError("only non-reentrant checkpointing can replay the registered generators")
    return torch_checkpoint(function, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
