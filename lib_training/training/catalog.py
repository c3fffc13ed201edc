"""The training methods on offer, and requests to train: settings in three groups, validated together.

A request is JSON-like data `{"method": {...}, "data": {...}, "loop": {...}}`: the method's own
settings, the dataset settings and the training-loop settings. Each method may change the loop's
defaults (textual inversion and LoRA want different learning rates). The UI, the CLI and the HTTP
API all read their fields from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lib_training.dataset import DatasetConfig
from lib_training.options import SettingsError, field_errors, from_dict, to_dict
from lib_training.training.config import LoopConfig
from lib_training.training.method import TrainingMethod

GROUPS = ("method", "data", "loop")


@dataclass(frozen=True)
class MethodSpec:
    kind: str  # "embedding": the URL and CLI name
    title: str  # "Textual inversion": the tab title
    settings: type  # the method's settings dataclass
    build: Callable[[Any], TrainingMethod]
    loop_defaults: Mapping[str, Any] = field(default_factory=dict)
    data_defaults: Mapping[str, Any] = field(default_factory=dict)

    def group(self, name: str) -> tuple[type, Mapping[str, Any]]:
        """(settings class, default overrides) of a request group."""
        return {
            "method": (self.settings, {}),
            "data": (DatasetConfig, self.data_defaults),
            "loop": (LoopConfig, self.loop_defaults),
        }[name]


@dataclass
class TrainingRequest:
    spec: MethodSpec
    method: Any
    data: DatasetConfig
    loop: LoopConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"method": to_dict(self.method), "data": to_dict(self.data), "loop": to_dict(self.loop)}

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def overwrite(self) -> bool:
        return bool(getattr(self.method, "overwrite", False))


def request_errors(spec: MethodSpec, body: Any) -> dict[str, str]:
    """Problems with a request body, by dotted field name ("loop.steps": "must be at least 1")."""
    if not isinstance(body, Mapping):
        return {"": "expected a JSON object with 'method', 'data' and 'loop' settings"}
    errors = {key: "unknown group (expected method, data, loop)" for key in body if key not in GROUPS}
    for group in GROUPS:
        cls, defaults = spec.group(group)
        for name, problem in field_errors(cls, body.get(group, {}), defaults).items():
            errors[f"{group}.{name}" if name else group] = problem
    return errors


def parse_request(spec: MethodSpec, body: Any) -> TrainingRequest:
    """A validated request; raises SettingsError listing every bad field at once."""
    errors = request_errors(spec, body)
    if errors:
        raise SettingsError(errors)
    parts = {group: from_dict(*_with_data(spec, group, body)) for group in GROUPS}
    if hasattr(parts["method"], "check"):
        parts["method"].check()
    return TrainingRequest(spec, parts["method"], parts["data"], parts["loop"])


def _with_data(spec: MethodSpec, group: str, body: Mapping[str, Any]) -> tuple[type, Mapping[str, Any], Mapping]:
    cls, defaults = spec.group(group)
    return cls, body.get(group, {}), defaults


def _methods() -> dict[str, MethodSpec]:
    from lib_training.methods.embedding import EmbeddingConfig, EmbeddingMethod

    embedding = MethodSpec(
        kind="embedding",
        title="Textual inversion",
        settings=EmbeddingConfig,
        build=EmbeddingMethod,
        loop_defaults={"lr": "0.005"},
    )
    return {spec.kind: spec for spec in (embedding,)}


METHODS: dict[str, MethodSpec] = _methods()
