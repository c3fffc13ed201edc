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
from lib_training.errors import ConfigError
from lib_training.options import SettingsError, convert, describe, field_errors, from_dict, to_dict
from lib_training.training.config import LoopConfig
from lib_training.training.lr_schedule import parse_schedule
from lib_training.training.method import MethodSettings, MethodSpec, TrainingMethod
from lib_training.training.text_cache import text_caching_problem

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


MAX_LEARNING_RATE = 10.0  # far above any useful rate (Prodigy's multiplier is about 1); larger ones overflow


def request_errors(spec: MethodSpec, body: Any) -> dict[str, str]:
    """Problems with a request body, by dotted field name ("loop.steps": "must be at least 1").

    Every field is checked, each as far as it can be on its own: kinds and ranges, then the
    learning-rate and clipping schedules' syntax and values, the dataset folder (it exists, can be
    read and holds images; the images themselves are opened when training starts), the prompt
    template, the size rules, and the method's own check. Quick: nothing is loaded.
    """
    if not isinstance(body, Mapping):
        return {"": "expected a JSON object with 'method', 'data' and 'loop' settings"}
    errors = {key: "unknown group (expected method, data, loop)" for key in body if key not in (*GROUPS, "resume")}
    if not isinstance(body.get("resume", False), bool):
        errors["resume"] = f"expected true or false, got {body['resume']!r}"
    values: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        cls, defaults = group_settings(spec, group)
        given = body.get(group, {})
        problems = field_errors(cls, given, defaults)
        for name, problem in problems.items():
            errors[f"{group}.{name}" if name else group] = problem
        values[group] = _valid_values(cls, given if isinstance(given, Mapping) else {}, defaults, problems)
    _check_loop(values["loop"], errors, default_lr=str(group_settings(spec, "loop")[1].get("lr", "0.005")))
    _check_data(values["data"], errors)
    _check_method(spec, values["method"], errors)
    _check_text_caching(spec, values, errors)
    return errors


def _valid_values(
    cls: type, given: Mapping[str, Any], defaults: Mapping[str, Any], problems: Mapping[str, str]
) -> dict[str, Any]:
    """The group's settings as far as they are valid: given values that convert, else the defaults."""
    infos = {info.name: info for info in describe(cls, defaults)}
    values = {name: info.default for name, info in infos.items()}
    for name, value in given.items():
        if name in infos and name not in problems:
            values[name] = convert(infos[name], value)
    return values


def _schedule_problem(
    text: str, *, what: str, limit: float | None = None, default: str = "", **shape: Any
) -> str | None:
    try:
        schedule = parse_schedule(text, what=what, **shape)
    except ConfigError as error:
        return str(error)
    largest = max(value for value, _ in schedule.pieces)
    if limit is not None and largest > limit:
        return (
            f"the {what} {largest:g} is far too large (at most {limit:g}); usual values are 1e-4 to 0.01 "
            f"(the default here is {default})"
        )
    return None


def _check_loop(loop: dict[str, Any], errors: dict[str, str], default_lr: str) -> None:
    steps = loop["steps"] if "loop.steps" not in errors else 10_000_000
    warmup = loop["lr_warmup_steps"]
    if "loop.lr_warmup_steps" not in errors and "loop.steps" not in errors and warmup > steps:
        errors["loop.lr_warmup_steps"] = f"must be at most the number of steps ({steps:,}), got {warmup:,}"
    shape = {
        "total_steps": steps,
        "name": loop["lr_scheduler"] if "loop.lr_scheduler" not in errors else "constant",
        "warmup_steps": min(warmup, steps) if "loop.lr_warmup_steps" not in errors else 0,
        "cycles": loop["lr_cycles"] if "loop.lr_cycles" not in errors else 1,
    }
    if "loop.lr" not in errors:
        problem = _schedule_problem(
            str(loop["lr"]), what="learning rate", limit=MAX_LEARNING_RATE, default=default_lr, **shape
        )
        if problem:
            errors["loop.lr"] = problem
    if "loop.clip_grad_value" not in errors and loop["clip_grad"] != "none":
        problem = _schedule_problem(str(loop["clip_grad_value"]), what="gradient clipping limit", total_steps=steps)
        if problem:
            errors["loop.clip_grad_value"] = problem


def _check_data(data: dict[str, Any], errors: dict[str, str]) -> None:
    config = DatasetConfig(**{**data, "path": data.get("path") or ""})
    for name, problem in config.problems().items():
        errors.setdefault(f"data.{name}", problem)
    if "data.path" not in errors:
        problem = config.folder_problem()
        if problem:
            errors["data.path"] = problem
    if "data.template" not in errors:
        problem = config.template_problem()
        if problem:
            errors["data.template"] = problem


def _check_method(spec: MethodSpec, method: dict[str, Any], errors: dict[str, str]) -> None:
    if "method.name" not in errors and not str(method.get("name") or "").strip():
        errors["method.name"] = "required: give the result a name"
    if any(key.startswith("method.") or key == "method" for key in errors):
        return  # the method's own check needs every one of its fields
    try:
        spec.settings(**method).check()
    except SettingsError as error:
        errors.update({f"method.{name}" if name else "method": problem for name, problem in error.errors.items()})
    except ConfigError as error:
        errors["method"] = str(error)


def _check_text_caching(spec: MethodSpec, values: dict[str, dict[str, Any]], errors: dict[str, str]) -> None:
    """cache_text_outputs needs frozen text encoders (the method's settings) and fixed prompts (the data's)."""
    loop, data = values["loop"], values["data"]
    if not (loop["cache_text_outputs"] or loop["cache_text_outputs_to_disk"]) or any(
        key.startswith("method") for key in errors
    ):
        return
    method = spec.build(spec.settings(**values["method"]))
    prompts_vary = DatasetConfig(**{**data, "path": data.get("path") or ""}).prompts_vary
    problem = text_caching_problem(method.trains_text_encoders, prompts_vary)
    if problem:
        field = "loop.cache_text_outputs" if loop["cache_text_outputs"] else "loop.cache_text_outputs_to_disk"
        errors.setdefault(field, problem)


def parse_request(spec: MethodSpec, body: Any) -> TrainingRequest:
    """A validated request; raises SettingsError listing every bad field at once."""
    errors = request_errors(spec, body)
    if errors:
        raise SettingsError(errors)
    parts = {}
    for group in GROUPS:
        cls, defaults = group_settings(spec, group)
        parts[group] = from_dict(cls, body.get(group, {}), defaults)
    return TrainingRequest(spec, parts["method"], parts["data"], parts["loop"], bool(body.get("resume", False)))
