"""The Merge tab's jobs: checkpoint merges and the LoRA tools, run on the shared `JobManager`.

A merge is a job like a training run, so only one job runs at a time whatever its kind: a merge
never runs beside a training. A request is JSON-like settings of the tool's config class
(`MergeConfig`, `LoraBakeConfig`, ...). Model inputs are paths, or names relative to the
workspace's model folders (as the Merge tab's pickers show them); a relative output name goes to
the workspace's merge output folder, with `.safetensors` added when it has no model extension.

`errors()` finds a request's problems before anything runs, in stages: the fields one by one, then
the input files (present, of one family, block weights that fit it: read from the safetensors
headers only), then the config's own checks. The job's progress counts tensors (or LoRA modules); its fraction
and ETA go by the bytes written (or the weights' elements), which follow the time taken better.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_training.app.jobs import Job, JobContext, JobManager
from lib_training.app.service import Workspace
from lib_training.errors import ConfigError, UserError
from lib_training.formats.family import ModelFamily
from lib_training.formats.tensor_files import read_safetensors_header
from lib_training.merge import (
    CancelledError,
    LoraBakeConfig,
    LoraExtractConfig,
    LoraResizeConfig,
    LoraSpec,
    MergeConfig,
    WriteProgress,
    bake_loras,
    extract_lora,
    merge,
    resize_lora,
)
from lib_training.merge.blocks import parse_blocks
from lib_training.merge.inputs import check_same_family, family_of
from lib_training.merge.reader import open_input
from lib_training.options import FieldInfo, SettingsError, describe, field_errors, from_dict, json_schema, to_dict
from lib_training.training.progress import Progress, format_duration

ROLE_FOLDERS = {"model": "checkpoints", "lora": "loras", "vae": "vaes"}  # field role -> model folder kind
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
SCAN_DEPTH = 3  # subfolder levels searched below a model folder
SCAN_LIMIT = 20_000  # directory entries looked at per folder, at most


@dataclass(frozen=True)
class MergeTool:
    """One operation of the Merge tab."""

    kind: str  # the job kind and the API route: "merge", "lora/bake", ...
    title: str  # "Checkpoint merge"
    config: type  # its settings dataclass
    run: Callable[..., Any]  # run(config, progress=, cancel=, **more) -> a result with path, data_sha256, ...
    output: str  # the model-folder kind of what it writes: "checkpoints" or "loras"
    phase: str  # the progress phase while it runs: "merging"
    unit: str  # what its progress counts: "tensors" or "modules"
    in_bytes: bool = True  # its progress sizes are bytes written (else weight elements)
    rows: tuple[str, type] | None = None  # a list field given as rows of a settings class: ("loras", LoraSpec)
    known_hashes: bool = False  # `run` takes known_sha256=


TOOLS: dict[str, MergeTool] = {
    tool.kind: tool
    for tool in (
        MergeTool(
            "merge", "Checkpoint merge", MergeConfig, merge, "checkpoints", "merging", "tensors", known_hashes=True
        ),
        MergeTool(
            "lora/bake",
            "LoRA bake",
            LoraBakeConfig,
            bake_loras,
            "checkpoints",
            "baking",
            "tensors",
            rows=("loras", LoraSpec),
        ),
        MergeTool(
            "lora/extract", "LoRA extract", LoraExtractConfig, extract_lora, "loras", "extracting", "modules", False
        ),
        MergeTool("lora/resize", "LoRA resize", LoraResizeConfig, resize_lora, "loras", "resizing", "modules", False),
    )
}


def tool(kind: str) -> MergeTool:
    if kind not in TOOLS:
        raise ConfigError(f"unknown merge tool {kind!r}; available: {', '.join(TOOLS)}")
    return TOOLS[kind]


def field_used(info: FieldInfo, method: str | None) -> bool:
    """Whether a field applies to a merge method: fields without `used_by` apply to every method."""
    return info.used_by is None or method is None or method in info.used_by


def request_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a tool's request body (its config's fields; the bake's `loras` as an array)."""
    spec = tool(kind)
    schema = json_schema(spec.config)
    if spec.rows is not None:
        name, row = spec.rows
        schema["properties"][name] = {
            "type": "array",
            "title": name.capitalize(),
            "description": f"{row.__doc__.strip()} At least one, applied in order.",
            "items": json_schema(row),
            "minItems": 1,
        }
        schema["required"] = [*schema.get("required", []), name]
    return schema


def format_size(size: float) -> str:
    """'41.9 MB', '2.13 GB' (powers of 1000, as file managers show them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class MergeProgress(Progress):
    """A merge tool's progress: `step` of `total` tensors or modules; the fraction and ETA by size."""

    done_size: int = 0  # bytes written (merge, bake) or weight elements processed (LoRA extract, resize)
    total_size: int = 0
    unit: str = "tensors"

    @property
    def fraction(self) -> float:
        if self.total_size:
            return self.done_size / self.total_size
        return super().fraction

    def describe(self) -> str:
        parts = [f"{self.phase} {self.step}/{self.total} {self.unit}"]
        if self.message:
            parts.append(self.message)
        if self.eta_seconds is not None:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        return ", ".join(parts)


def job_progress(spec: MergeTool, progress: WriteProgress) -> MergeProgress:
    """A merge tool's progress report as the job shows it."""
    rate = progress.done_tensors / progress.elapsed if progress.elapsed > 0 else None
    message = ""
    if spec.in_bytes:
        message = f"{format_size(progress.done_bytes)} of {format_size(progress.total_bytes)} written"
    return MergeProgress(
        phase=spec.phase,
        step=progress.done_tensors,
        total=progress.total_tensors,
        steps_per_second=rate,
        eta_seconds=progress.eta,
        message=message,
        done_size=progress.done_bytes,
        total_size=progress.total_bytes,
        unit=spec.unit,
    )


def result_summary(result: Any) -> dict[str, Any]:
    """A tool's result as the job's JSON result: path, sha256 of the tensor data, size, time, warnings."""
    path = Path(result.path)
    size = getattr(result, "size", None)
    summary: dict[str, Any] = {
        "result": str(path),
        "sha256": result.data_sha256,
        "size": size if size is not None else path.stat().st_size,
        "seconds": round(result.seconds, 3),
        "warnings": list(result.warnings),
    }
    for name in ("merged", "copied", "modules", "weights", "input_sha256"):
        if hasattr(result, name):
            summary[name] = getattr(result, name)
    return summary


def file_roles(path: Path) -> frozenset[str]:
    """What a model file can be given as: "model", "lora" and/or "vae" (from a safetensors file's keys;
    a pickle by its extension: .ckpt a checkpoint or a VAE, .pt/.pth a VAE)."""
    suffix = path.suffix.lower()
    if suffix != ".safetensors":
        return frozenset({"model", "vae"}) if suffix == ".ckpt" else frozenset({"vae"})
    try:
        keys = [key for key in read_safetensors_header(path) if key != "__metadata__"]
    except (UserError, OSError, ValueError):
        return frozenset()
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k for k in keys):
        return frozenset({"lora"})
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return frozenset({"model"})
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return frozenset({"vae"})
    return frozenset()


def model_files_in(folder: Path) -> list[Path]:
    """Model files in `folder` and its subfolders (to `SCAN_DEPTH` levels; hidden ones skipped)."""
    found: list[Path] = []
    seen = 0
    for here, folders, files in os.walk(folder):
        depth = len(Path(here).relative_to(folder).parts)
        folders[:] = sorted(f for f in folders if not f.startswith(".")) if depth < SCAN_DEPTH else []
        for name in sorted(files):
            seen += 1
            if not name.startswith(".") and name.lower().endswith(MODEL_SUFFIXES):
                found.append(Path(here) / name)
        seen += len(folders)
        if seen > SCAN_LIMIT:
            break
    return found


class MergeService:
    """Starts the merge tools as jobs on the workspace's `JobManager` (the one training uses)."""

    def __init__(self, workspace: Workspace, jobs: JobManager) -> None:
        self.workspace = workspace
        self.jobs = jobs
        self._roles: dict[Path, tuple[int, int, frozenset[str]]] = {}  # path -> (mtime_ns, size, roles)

    # --- model files ------------------------------------------------------------------------------
    def folders(self, role: str) -> list[Path]:
        """The model folders searched for inputs of `role` ("model", "lora", "vae"), each once."""
        unique: list[Path] = []
        for folder in self.workspace.model_folders().get(ROLE_FOLDERS[role], []):
            if Path(folder) not in unique:
                unique.append(Path(folder))
        return unique

    def model_files(self, role: str) -> list[str]:
        """The files of `role` in the model folders, as a picker lists them: relative to their folder,
        or the full path where an earlier folder has a file of that name (which the name would mean)."""
        names: list[str] = []
        taken: set[str] = set()
        listed: set[Path] = set()  # a folder may hold another (outputs inside the checkpoint's folder)
        for folder in self.folders(role):
            if not folder.is_dir():
                continue
            files = model_files_in(folder)
            relative = [path.relative_to(folder).as_posix() for path in files]
            for path, name in zip(files, relative):
                if path.resolve() not in listed and role in self._file_roles(path):
                    names.append(str(path) if name in taken else name)
                    listed.add(path.resolve())
            taken.update(relative)
        return sorted(names, key=str.lower)

    def _file_roles(self, path: Path) -> frozenset[str]:
        try:
            stat = path.stat()
        except OSError:
            return frozenset()
        cached = self._roles.get(path)
        if cached is None or cached[:2] != (stat.st_mtime_ns, stat.st_size):
            cached = (stat.st_mtime_ns, stat.st_size, file_roles(path))
            self._roles[path] = cached
        return cached[2]

    def resolve_input(self, role: str, text: str) -> str:
        """The path an input names: a path as given (`~` expanded), a name relative to a model folder
        of `role` (the first that has it), else relative to the working folder."""
        text = text.strip()
        if not text:
            return text
        path = Path(text).expanduser()
        if path.is_absolute():
            return str(path)
        for folder in self.folders(role):
            if (folder / path).is_file():
                return str(folder / path)
        return str(path.resolve()) if path.exists() else text

    def resolve_output(self, spec: MergeTool, text: str) -> str:
        """The path an output names: absolute as given, else in the workspace's merge output folder."""
        text = text.strip()
        if not text:
            return text
        path = Path(text).expanduser()
        if path.suffix.lower() not in MODEL_SUFFIXES:
            path = path.with_name(path.name + ".safetensors")
        if not path.is_absolute():
            path = self.workspace.merge_output_folder(spec.output) / path
        return str(path)

    # --- requests ---------------------------------------------------------------------------------
    def errors(self, kind: str, body: Any) -> dict[str, str]:
        """Every problem found with a request, by field ("loras.0.path" for rows, "" for the whole)."""
        try:
            self.parse(kind, body)
        except SettingsError as error:
            return error.errors
        return {}

    def parse(self, kind: str, body: Any) -> Any:
        """The tool's config from a request, paths resolved; SettingsError lists every problem found."""
        spec = tool(kind)
        if not isinstance(body, Mapping):
            raise SettingsError({"": f"expected a JSON object of settings, got {type(body).__name__}"})
        data = dict(body)
        rows = data.pop(spec.rows[0], None) if spec.rows is not None else None
        errors = field_errors(spec.config, data)
        specs = self._parse_rows(spec, rows, errors) if spec.rows is not None else None
        if errors:
            self._missing_inputs(spec, data, errors)  # named with the other problems, not after them
            raise SettingsError(errors)
        config = from_dict(spec.config, data)
        if spec.rows is not None:
            setattr(config, spec.rows[0], specs)
        self._resolve(spec, config, errors)
        if not errors:
            self._check_files(spec, config, errors)
        if not errors:
            self._check_models(spec, config, errors)
        if not errors:
            try:
                config.validate()
            except ConfigError as error:
                errors[""] = str(error)
        if errors:
            raise SettingsError(errors)
        return config

    @staticmethod
    def _parse_rows(spec: MergeTool, rows: Any, errors: dict[str, str]) -> list[Any]:
        name, row = spec.rows  # type: ignore[misc]
        if not rows:
            errors[name] = f"give at least one of the {name}"
            return []
        if not isinstance(rows, list):
            errors[name] = f"expected a list of objects ({', '.join(info.name for info in describe(row))})"
            return []
        parsed = []
        for index, item in enumerate(rows):
            problems = field_errors(row, item)
            for field_name, problem in problems.items():
                errors[f"{name}.{index}.{field_name}" if field_name else f"{name}.{index}"] = problem
            if not problems:
                parsed.append(from_dict(row, item))
        return parsed

    def _inputs(self, spec: MergeTool, config: Any) -> list[tuple[str, FieldInfo, Any]]:
        """(error key, field, settings object) of every model input the request uses."""
        method = getattr(config, "method", None)
        found = [
            (info.name, info, config)
            for info in describe(spec.config)
            if info.role in ROLE_FOLDERS and field_used(info, method)
        ]
        if spec.rows is not None:
            name, row = spec.rows
            for index, item in enumerate(getattr(config, name)):
                found += [(f"{name}.{index}.{i.name}", i, item) for i in describe(row) if i.role in ROLE_FOLDERS]
        return found

    def _resolve(self, spec: MergeTool, config: Any, errors: dict[str, str]) -> None:
        for _, info, holder in self._inputs(spec, config):
            setattr(holder, info.name, self.resolve_input(info.role, getattr(holder, info.name)))  # type: ignore[arg-type]
        for info in describe(spec.config):
            if info.role == "output":
                try:
                    setattr(config, info.name, self.resolve_output(spec, getattr(config, info.name)))
                except ConfigError as error:
                    errors[info.name] = str(error)

    @staticmethod
    def _missing_inputs(spec: MergeTool, data: Mapping[str, Any], errors: dict[str, str]) -> None:
        """Add "needs this model" for each empty model input the chosen method uses (as `_check_files` does)."""
        infos = describe(spec.config)
        method = data.get("method", next((i.default for i in infos if i.name == "method"), None))
        for info in infos:
            needed = info.role in ROLE_FOLDERS and info.used_by is not None and method in info.used_by
            if needed and not data.get(info.name) and info.name not in errors:
                errors[info.name] = f"the {method} method needs this model"

    def _check_files(self, spec: MergeTool, config: Any, errors: dict[str, str]) -> None:
        method = getattr(config, "method", None)
        for key, info, holder in self._inputs(spec, config):
            value = getattr(holder, info.name)
            if not value:
                if info.used_by is not None and method in info.used_by:
                    errors[key] = f"the {method} method needs this model"
                continue
            path = Path(value)
            if not path.is_file():
                folders = ", ".join(str(f) for f in self.folders(info.role)) or "no model folders"  # type: ignore[arg-type]
                where = "" if path.is_absolute() else f" (looked in {folders} and the working folder)"
                errors[key] = f"no such file: {value}{where}"
        for info in describe(spec.config):
            if info.role == "output" and getattr(config, info.name):
                out = Path(getattr(config, info.name))
                if out.exists() and not getattr(config, "overwrite", False):
                    errors[info.name] = f"{out} exists: choose another name, or allow overwriting"

    def _check_models(self, spec: MergeTool, config: Any, errors: dict[str, str]) -> None:
        """Families and block weights, from the headers of safetensors inputs (pickles are checked by the run)."""
        families: dict[str, ModelFamily] = {}
        paths: dict[str, Path] = {}
        for key, info, holder in self._inputs(spec, config):
            path = Path(getattr(holder, info.name))
            if info.role != "model" or path.suffix.lower() != ".safetensors":
                continue
            label = f"model {key.upper()}" if len(key) == 1 else info.label.lower()
            try:
                with open_input(path) as source:
                    families[key], paths[key] = family_of(source, label), path
            except UserError as error:
                errors[key] = str(error)
        if errors or not families:
            return
        try:
            check_same_family(families, paths)
        except UserError as error:
            errors[""] = str(error)
            return
        arch = next(iter(families.values())).arch
        method = getattr(config, "method", None)
        blocks = [(i.name, i, config) for i in describe(spec.config) if i.role == "blocks" and field_used(i, method)]
        if spec.rows is not None:
            name, row = spec.rows
            for index, item in enumerate(getattr(config, name)):
                blocks += [(f"{name}.{index}.{i.name}", i, item) for i in describe(row) if i.role == "blocks"]
        for key, info, holder in blocks:
            try:
                parse_blocks(getattr(holder, info.name), arch)
            except ConfigError as error:
                errors[key] = str(error)

    # --- jobs -------------------------------------------------------------------------------------
    def start(self, kind: str, body: Any) -> Job:
        """Validate a request and start it as a job: SettingsError (invalid), JobBusyError (a job runs)."""
        spec = tool(kind)
        config = self.parse(kind, body)
        settings = to_dict(config)
        if spec.rows is not None:
            settings[spec.rows[0]] = [to_dict(item) for item in getattr(config, spec.rows[0])]

        def work(context: JobContext) -> dict[str, Any]:
            return self._run(spec, config, context)

        return self.jobs.start(spec.kind, f"{spec.title}: {Path(config.out).name}", work, settings)

    def _run(self, spec: MergeTool, config: Any, context: JobContext) -> dict[str, Any]:
        def report(progress: WriteProgress) -> None:
            context.report(job_progress(spec, progress))

        more: dict[str, Any] = {}
        if spec.known_hashes:
            more["known_sha256"] = self.workspace.known_sha256(list(config.models().values()))
        try:
            result = spec.run(config, progress=report, cancel=context.should_stop, **more)
        except CancelledError as error:
            return {"cancelled": True, "message": str(error)}
        summary = result_summary(result)
        self.workspace.after_merge(spec.output, Path(summary["result"]))
        return summary

    def results(self, kind: str) -> list[Job]:
        """Jobs of `kind` that wrote a file, newest first (the `JobManager` keeps the last few jobs)."""
        done = [job for job in self.jobs.jobs() if job.kind == kind and not job.running and job.result.get("result")]
        return sorted(done, key=lambda job: job.started, reverse=True)
