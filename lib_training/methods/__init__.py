"""The training methods: the one place a method is declared.

Each method is a module here exporting a `SPEC` (`lib_training.training.method.MethodSpec`); the
list below is all there is to adding one. The Training sub-tabs, the HTTP routes and their schema,
the `train <kind>` CLI subcommands, output folders and what a host does with a new result are all
derived from the registered specs, read when each is built (so `register` in a test is enough).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lib_training.errors import ConfigError
from lib_training.methods import embedding, hypernetwork, lora
from lib_training.training.method import MethodSpec

_REGISTRY: dict[str, MethodSpec] = {spec.kind: spec for spec in (embedding.SPEC, lora.SPEC, hypernetwork.SPEC)}


def registered() -> dict[str, MethodSpec]:
    """Every method, by kind, in the order they are offered."""
    return dict(_REGISTRY)


def spec_for(kind: str) -> MethodSpec:
    """The method registered as `kind`; a ConfigError naming the others if there is none."""
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown training method {kind!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[kind]


def for_prompt_tag(tag: str) -> MethodSpec | None:
    """The method whose results a prompt applies as <TAG:NAME:STRENGTH>, if any."""
    return next((spec for spec in _REGISTRY.values() if spec.prompt_tag == tag), None)


def register(spec: MethodSpec) -> None:
    """Add a method (the built-in ones are listed above; tests and plug-ins add theirs here)."""
    if spec.kind in _REGISTRY:
        raise ValueError(f"a method {spec.kind!r} is already registered")
    _REGISTRY[spec.kind] = spec


def unregister(kind: str) -> None:
    _REGISTRY.pop(kind, None)


@contextmanager
def registered_for(spec: MethodSpec) -> Iterator[MethodSpec]:
    """`spec` registered while inside (for tests)."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.kind)
