"""A request to train: settings in three groups, validated together, parsed once.

A request is JSON-like data `{"method": {...}, "data": {...}, "loop": {...}, "resume": false}`:
the method's own settings, the dataset settings and the training-loop settings. A method may
change the loop's defaults (textual inversion and LoRA want different learning rates). The UI,
the CLI and the HTTP API all turn their input into this one shape and call `parse_request`, which
reports every bad field at once (`SettingsError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lib_training.dataset import DatasetConfig
from lib_training.options import SettingsError, field_errors, from_dict, to_dict
from lib_training.training.config import LoopConfig
from lib_training.training.method import MethodSettings, MethodSpec, TrainingMethod

GROUPS = ("method", "data", "loop")


def group_settings(spec: MethodSpec, group: str) -> tuple[type, Mapping[str, Any]]:
    """(settings class, the method's default overrides) of a request group."""
    return {
        "method": (spec.settings, {}),
        "data": (DatasetConfig, spec.data_defaults),
        "loop": (LoopConfig, spec.loop_defaults),
    }[group]


@dataclass
class TrainingRequest:
    spec: MethodSpec
    method: MethodSettings
    data: DatasetConfig
    loop: LoopConfig
    resume: bool = False

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"method": to_dict(self.method), "data": to_dict(self.data), "loop": to_dict(self.loop)}

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def overwrite(self) -> bool:
        return self.method.overwrite

    def build(self) -> TrainingMethod:
        return self.spec.build(self.method)


def request_errors(spec: MethodSpec, body: Any) -> dict[str, str]:
    """Problems with a request body, by dotted field name ("loop.steps": "must be at least 1")."""
    if not isinstance(body, Mapping):
        return {"": "expected a JSON object with 'method', 'data' and 'loop' settings"}
    errors = {key: "unknown group (expected method, data, loop)" for key in body if key not in (*GROUPS, "resume")}
    if not isinstance(body.get("resume", False), bool):
        errors["resume"] = f"expected true or false, got {body['resume']!r}"
    for group in GROUPS:
        cls, defaults = group_settings(spec, group)
        for name, problem in field_errors(cls, body.get(group, {}), defaults).items():
            errors[f"{group}.{name}" if name else group] = problem
    return errors


def parse_request(spec: MethodSpec, body: Any) -> TrainingRequest:
    """A validated request; raises SettingsError listing every bad field at once."""
    errors = request_errors(spec, body)
    if errors:
        raise SettingsError(errors)
    parts = {}
    for group in GROUPS:
        cls, defaults = group_settings(spec, group)
        parts[group] = from_dict(cls, body.get(group, {}), defaults)
    parts["method"].check()  # settings that cannot work together: a ConfigError
    return TrainingRequest(spec, parts["method"], parts["data"], parts["loop"], bool(body.get("resume", False)))
