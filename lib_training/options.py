"""Typed settings, declared once and used by the UI, the CLI and the HTTP API alike.

A settings class is a dataclass whose fields are declared with `option(...)`: default, one-line
help, and optional range, choices and CLI flag. From that one declaration:

- `add_arguments(parser, cls)` adds the command-line options, and `from_namespace` reads them back;
- `describe(cls)` lists the fields (label, help, kind, default, range, choices) for the UI and the
  OpenAPI schema;
- `from_dict(cls, data)` / `to_dict(obj)` convert to and from JSON (config.json, API requests),
  with every invalid field reported at once by `validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lib_training.errors import ConfigError

T = TypeVar("T")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[str] | None = None,
    flag: str | None = None,
    label: str | None = None,
    advanced: bool = False,
    internal: bool = False,
    role: str | None = None,
    used_by: Sequence[str] | None = None,
) -> Any:
    """Declare a settings field.

    `flag` overrides the CLI flag (default `--field-name`); `label` the UI label (default from the
    name); `advanced` puts it in the UI's advanced section; `internal` hides it from the CLI and UI
    (it is still in JSON). `role` says what a text field holds, for a UI to offer the right picker
    ("model", "lora", "vae", "output", "folder", "regex", "blocks"); `used_by` names the variants
    (e.g. merge methods) that use the field, so a UI can hide it for the others.
    """
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "choices": tuple(choices) if choices is not None else None,
        "flag": flag,
        "label": label,
        "advanced": advanced,
        "internal": internal,
        "role": role,
        "used_by": tuple(used_by) if used_by is not None else None,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldInfo:
    """What a UI or schema needs to know about one field."""

    name: str
    kind: str  # "int", "float", "bool", "str", "path"
    label: str
    help: str
    default: Any
    required: bool
    min: float | None
    max: float | None
    choices: tuple[str, ...] | None
    flag: str
    advanced: bool
    optional: bool  # None is allowed
    role: str | None = None  # what a text field holds: "model", "lora", "output", "folder", "regex", "blocks"
    used_by: tuple[str, ...] | None = None  # the variants that use the field (None: all)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a resolved annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        none_ok = len(args) < len(typing.get_args(annotation))
        if len(args) == 2 and set(args) == {str, Path}:
            return Path, none_ok
        return args[0], none_ok
    return annotation, False


_KINDS = {int: "int", float: "float", bool: "bool", str: "str", Path: "path"}


def describe(cls: type, defaults: Mapping[str, Any] | None = None) -> list[FieldInfo]:
    """The fields of settings class `cls` that users set, in declaration order.

    `defaults` replaces the class's defaults for some fields (a method's own learning rate, say).
    """
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    infos = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        base, none_ok = _base_type(hints[f.name])
        kind = _KINDS.get(base)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported settings type {base!r}")
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        infos.append(
            FieldInfo(
                name=f.name,
                kind=kind,
                label=f.metadata.get("label") or default_label(f.name),
                help=f.metadata.get("help", ""),
                default=default,
                required=f.default is MISSING and f.default_factory is MISSING and f.name not in defaults,
                min=f.metadata.get("min"),
                max=f.metadata.get("max"),
                choices=f.metadata.get("choices"),
                flag=f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                advanced=bool(f.metadata.get("advanced")),
                optional=none_ok,
                role=f.metadata.get("role"),
                used_by=f.metadata.get("used_by"),
            )
        )
    return infos


_ACRONYMS = {"unet": "UNet", "vae": "VAE", "ema": "EMA", "lr": "LR", "cfg": "CFG", "snr": "SNR", "svd": "SVD"}


def default_label(name: str) -> str:
    """A UI label from a field name: words capitalised like a sentence, known acronyms kept."""
    words = [_ACRONYMS.get(word, word) for word in name.split("_")]
    if words and words[0] == name.split("_")[0]:
        words[0] = words[0].capitalize()
    return " ".join(words)


def convert(info: FieldInfo, value: Any) -> Any:
    """Coerce a JSON/CLI value to the field's kind; raise ValueError with a short reason."""
    if value is None:
        if info.optional:
            return None
        raise ValueError("a value is required")
    if info.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if info.kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if info.kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if info.kind == "path":
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value


def field_errors(cls: type, data: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every problem with `data` as settings of `cls`, by field name (empty when valid)."""
    errors: dict[str, str] = {}
    if not isinstance(data, Mapping):
        return {"": f"expected an object of settings, got {type(data).__name__}"}
    infos = {info.name: info for info in describe(cls, defaults)}
    internal = {f.name for f in dataclasses.fields(cls) if f.metadata.get("internal")}
    for key in data:
        if key not in infos and key not in internal:
            errors[key] = "unknown setting"
    for name, info in infos.items():
        if name not in data:
            if info.required:
                errors[name] = "required"
            continue
        try:
            value = convert(info, data[name])
        except ValueError as error:
            errors[name] = str(error)
            continue
        if value is None:
            continue
        if info.choices is not None and value not in info.choices:
            errors[name] = f"must be one of {', '.join(info.choices)} (got {value!r})"
        elif info.min is not None and value < info.min:
            errors[name] = f"must be at least {info.min:g} (got {value})"
        elif info.max is not None and value > info.max:
            errors[name] = f"must be at most {info.max:g} (got {value})"
    return errors


class SettingsError(ConfigError):
    """Invalid settings; `errors` maps each bad field to its problem."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        listed = "; ".join(f"{name}: {problem}" for name, problem in self.errors.items())
        super().__init__(f"invalid settings: {listed}")


def from_dict(cls: type[T], data: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> T:
    """Build settings from JSON-like data, converting kinds; raise SettingsError listing every bad field.

    Fields missing from `data` take `defaults`, then the class's own defaults.
    """
    errors = field_errors(cls, data, defaults)
    if errors:
        raise SettingsError(errors)
    infos = {info.name: info for info in describe(cls, defaults)}
    values = {name: value for name, value in (defaults or {}).items() if name not in data}
    values.update({name: convert(infos[name], value) if name in infos else value for name, value in data.items()})
    return cls(**values)


def to_dict(settings: Any) -> dict[str, Any]:
    """JSON-ready dict of a settings object (paths as strings)."""
    return {f.name: _jsonable(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def range_text(info: FieldInfo) -> str:
    """'1 to 75', 'at least 0', 'at most 4,096' or '' for a field's bounds (the CLI and the UI alike)."""
    if info.min is not None and info.max is not None:
        return f"{_number(info.min)} to {_number(info.max)}"
    if info.min is not None:
        return f"at least {_number(info.min)}"
    if info.max is not None:
        return f"at most {_number(info.max)}"
    return ""


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    skip: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one option per field of `cls` (help text, default and range shown; `defaults` replaces
    some of the class's defaults, as a method does for the loop's learning rate)."""
    for info in describe(cls, defaults):
        text = info.help
        bounds = range_text(info)
        if bounds:
            text += f" ({bounds})"
        if not info.required and info.default not in (None, "", False):
            text += f" (default: {info.default})"
        dest = info.name
        if info.kind == "bool" and info.flag.startswith("--no-"):  # already a negative: no --no-no-... twin
            parser.add_argument(info.flag, dest=dest, action="store_const", const=True, default=None, help=text)
        elif info.kind == "bool":
            parser.add_argument(info.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(
                info.flag,
                dest=dest,
                default=None,
                required=info.required,
                choices=info.choices,
                metavar=None if info.choices else info.kind.upper().replace("STR", "TEXT"),
                help=text,
            )


def namespace_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given on the command line (those not given are left out)."""
    return {info.name: getattr(args, info.name) for info in describe(cls) if getattr(args, info.name, None) is not None}


def from_namespace(cls: type[T], args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> T:
    """Settings from parsed CLI options: options not given keep their defaults."""
    return from_dict(cls, namespace_values(cls, args), defaults)


def json_schema(cls: type, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON Schema object for settings of `cls` (for the OpenAPI description)."""
    types_ = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "path": "string"}
    properties: dict[str, Any] = {}
    required = []
    for info in describe(cls, defaults):
        prop: dict[str, Any] = {"type": types_[info.kind], "title": info.label, "description": info.help}
        if info.optional:
            prop = {"anyOf": [prop, {"type": "null"}], "title": info.label, "description": info.help}
        if info.default is not None:
            prop["default"] = info.default
        if info.min is not None:
            prop["minimum"] = info.min
        if info.max is not None:
            prop["maximum"] = info.max
        if info.choices is not None:
            prop["enum"] = list(info.choices)
        properties[info.name] = prop
        if info.required:
            required.append(info.name)
    schema: dict[str, Any] = {"type": "object", "title": cls.__name__, "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema
