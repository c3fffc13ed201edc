"""Earlier training runs: find their `config.json` files and turn one back into a request body.

A run's `config.json` (see `training/outputs.py`) records "method" (with its "kind"), "data" and
"loop" among other things. Loading keeps only the fields the method's settings still have, so
files from older versions load too; what was left out is named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_training.app.service import TrainingService
from lib_training.errors import UserError
from lib_training.options import describe
from lib_training.training.method import MethodSpec
from lib_training.training.request import GROUPS, group_settings

CONFIG_NAME = "config.json"
MAX_DEPTH = 3  # folders below a results folder searched for run folders


@dataclass
class LoadedSettings:
    body: dict[str, dict[str, Any]]
    skipped: list[str] = field(default_factory=list)  # "loop.old_option": fields no longer known


def run_configs(service: TrainingService, spec: MethodSpec) -> list[Path]:
    """`config.json` files of earlier `kind` runs in the workspace's folders, newest first."""
    kind = spec.kind
    roots = {service.workspace.runs_root(spec)}
    folder = service.workspace.result_folders().get(kind)
    if folder is not None:
        roots.add(folder)
    found: dict[Path, float] = {}
    for root in roots:
        for path in _configs_below(root, MAX_DEPTH):
            try:
                found[path.resolve()] = path.stat().st_mtime
            except OSError:
                continue
    return [p for p in sorted(found, key=found.__getitem__, reverse=True) if _config_kind(p) == kind]


def _configs_below(root: Path, depth: int) -> Iterable[Path]:
    if depth < 0 or not root.is_dir():
        return
    candidate = root / CONFIG_NAME
    if candidate.is_file():
        yield candidate
    try:
        children = [child for child in root.iterdir() if child.is_dir() and not child.name.startswith(".")]
    except OSError:
        return
    for child in sorted(children):
        yield from _configs_below(child, depth - 1)


def _config_kind(path: Path) -> str | None:
    try:
        method = json.loads(path.read_text(encoding="utf-8")).get("method", {})
    except (OSError, ValueError, AttributeError):
        return None
    return method.get("kind") if isinstance(method, dict) else None


def load_run_settings(path: str | Path, spec: MethodSpec) -> LoadedSettings:
    """The request body stored in a run's `config.json` (or its folder); UserError if it is not one."""
    path = Path(str(path).strip()).expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist. Pick a run's config.json, or the run's folder.") from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path} as a run's settings: {error}") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(group), dict) for group in GROUPS):
        raise UserError(f"{path} is not the config.json of a training run (it lacks method, data and loop settings)")
    kind = record["method"].get("kind", spec.kind)
    if kind != spec.kind:
        raise UserError(f"{path} is a {kind!r} run; load it in that method's tab")
    loaded = LoadedSettings({})
    for group in GROUPS:
        cls, defaults = group_settings(spec, group)
        shown = {info.name for info in describe(cls, defaults)}
        hidden = {f.name for f in dataclasses.fields(cls)} - shown  # internal fields: set by the run itself
        stored = record[group]
        loaded.body[group] = {name: value for name, value in stored.items() if name in shown}
        loaded.skipped += [f"{group}.{name}" for name in stored if name not in shown | hidden and name != "kind"]
    return loaded
