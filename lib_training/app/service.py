"""What the UI and the HTTP API call: start a training job, preview a dataset, list outputs, generate.

A `Workspace` is the place we run in: the standalone app over a checkpoint file, or a WebUI with
its loaded model. It provides the model, says where outputs go, and is told when a result is
ready (a WebUI reloads its embeddings then); for the Merge tab it also says where models are and
where merged ones go. `TrainingService` is the same everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_training.app.aesthetic_service import AestheticRequest, AestheticService
from lib_training.app.jobs import Job, JobContext, JobManager
from lib_training.dataset import TrainingDataset
from lib_training.errors import ConfigError, UserError
from lib_training.formats.file_hashes import cached_sha256
from lib_training.methods import registered, spec_for
from lib_training.methods.applied import ResultFile, results_applied
from lib_training.model.diffusion import DiffusionModel
from lib_training.model.sampler import SampleSettings, generate
from lib_training.options import SettingsError
from lib_training.training.method import MethodSpec
from lib_training.training.outputs import RunFolder
from lib_training.training.request import TrainingRequest, parse_request
from lib_training.training.run import train


@dataclass(frozen=True)
class OutputFile:
    kind: str  # "embedding", ...
    name: str
    path: Path
    size: int
    modified: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "modified": self.modified,
        }


class Workspace(ABC):
    """Where training happens: the model, the output folders, and what to do with a result."""

    @abstractmethod
    def model(self) -> DiffusionModel:
        """The model to train on (loaded on first use)."""

    @abstractmethod
    def run_folder(self, spec: MethodSpec, name: str) -> Path:
        """Where a training run of method `spec` named `name` writes its files."""

    @abstractmethod
    def result_folders(self) -> dict[str, Path]:
        """Folders holding finished results, by method kind (scanned for the outputs list)."""

    def runs_root(self, spec: MethodSpec) -> Path:
        """The folder under which the run folders of `spec` are (searched for earlier runs' settings)."""
        return self.run_folder(spec, "_").parent

    def result_dir(self, spec: MethodSpec) -> Path | None:
        """Where the result file of a run goes, if not into its run folder (a WebUI's embeddings folder)."""
        return None

    def describe_model(self) -> str:
        return "the loaded model"

    def model_identity(self) -> dict[str, str]:
        """`sd_checkpoint` (short hash) and `sd_checkpoint_name` of the model, for the files trained on it."""
        return {}

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Held around everything a job does with the model: a WebUI prepares its model on entry
        (frozen, optimisations undone, LoRA unmerged, ...) and restores it on exit."""
        return contextlib.nullcontext()

    def after_training(self, spec: MethodSpec, result: Path) -> None:  # noqa: B027  (optional)
        """A result was written; a WebUI makes it usable here without a restart."""

    # --- for the Merge tab (optional: the defaults suit a workspace without model folders) -------------
    def model_folders(self) -> dict[str, list[Path]]:
        """Folders holding models, by kind: "checkpoints", "loras", "vaes" (searched in order, with
        their subfolders). The Merge tab offers their files, and input names relative to one of them
        are found there. Default: none (inputs are given as paths)."""
        return {}

    def merge_output_folder(self, kind: str) -> Path:
        """Where a merge tool writes an output given by a relative name: kind "checkpoints" (merges,
        LoRA bakes) or "loras" (LoRA extract and resize). Default: the first model folder of the kind."""
        folders = self.model_folders().get(kind)
        if not folders:
            raise ConfigError(f"there is no folder for {kind} here: give the output as an absolute path")
        return folders[0]

    def known_sha256(self, paths: list[Path]) -> dict[str, str]:
        """sha256 digests of model files the host already knows (its hash cache), by path; the merge
        computes the others. Default: none."""
        return {}

    def after_merge(self, kind: str, result: Path) -> None:  # noqa: B027  (optional)
        """A merge tool wrote `result` (kind "checkpoints" or "loras"); a WebUI refreshes its lists."""

    def aesthetic_folders(self) -> list[Path]:
        """Folders of aesthetic embeddings; new ones are written to the first. Default: none."""
        return []


class TrainingService:
    def __init__(self, workspace: Workspace, jobs: JobManager | None = None) -> None:
        self.workspace = workspace
        self.jobs = jobs or JobManager()
        self.aesthetic = AestheticService(workspace.aesthetic_folders(), self.jobs)

    # --- training -----------------------------------------------------------------------------
    @staticmethod
    def spec(kind: str) -> MethodSpec:
        return spec_for(kind)

    def parse(self, kind: str, body: Mapping[str, Any]) -> TrainingRequest:
        """The request in a body `{"method": .., "data": .., "loop": .., "resume": bool}`, validated once."""
        return parse_request(self.spec(kind), body)

    def start_training(self, kind: str, body: Mapping[str, Any] | TrainingRequest) -> Job:
        """Validate and start a training job; SettingsError (invalid), JobBusyError (another runs)."""
        request = body if isinstance(body, TrainingRequest) else self.parse(kind, body)
        self.jobs.ensure_idle()
        spec = request.spec
        folder = self.workspace.run_folder(spec, request.name)
        result_dir = self.workspace.result_dir(spec)
        problem = RunFolder(folder, request.name, request.build().suffix, result_dir).start_problem(
            request.overwrite, request.resume
        )
        if problem:
            raise SettingsError({"resume" if request.resume else "method.name": problem})

        def work(context: JobContext) -> dict[str, Any]:
            method = request.build()
            with self.workspace.session():
                result = train(
                    self.workspace.model(),
                    method,
                    request.data,
                    request.loop,
                    folder,
                    overwrite=request.overwrite,
                    resume=request.resume,
                    model_title=self.workspace.describe_model(),
                    on_progress=context.report,
                    should_stop=context.should_stop,
                    result_dir=result_dir,
                    file_metadata=self.workspace.model_identity(),
                )
            self.workspace.after_training(spec, result.result)
            return {
                "result": str(result.result),
                "folder": str(result.folder),
                "steps": result.step,
                "interrupted": result.interrupted,
                "loss": result.loss,
            }

        settings = {**request.to_dict(), "resume": request.resume}
        return self.jobs.start(f"train/{spec.kind}", f"{spec.title}: {request.name}", work, settings)

    def create(self, kind: str, values: Mapping[str, Any]) -> Path:
        """A method's Create step (`MethodSpec.create`): a new, untrained result written where the host
        looks for results of its kind (the app: OUT/KIND/) and published; SettingsError naming every
        bad field, UserError for a method without one."""
        spec = self.spec(kind)
        if spec.create is None:
            raise UserError(f"{spec.title} has no create step: its results come from training")
        if not isinstance(values, Mapping):
            raise SettingsError({"": f"expected an object of settings, got {type(values).__name__}"})
        path = spec.create.create(values, self.workspace.result_folders()[kind])
        self.workspace.after_training(spec, path)
        return path

    def preview_dataset(self, kind: str, body: Mapping[str, Any], samples: int = 8) -> dict[str, Any]:
        """Summary text, and a few (thumbnail, prompt) pairs, of the dataset a request would train on."""
        request = self.parse(kind, body)
        dataset = TrainingDataset(request.data, name=request.name)
        request.build().check_dataset(dataset)
        shown = []
        for item in range(min(samples, len(dataset.samples))):
            sample = dataset.sample(item, epoch=0)
            image = Image.open(dataset.samples[item].path).convert("RGB")
            image.thumbnail((192, 192))
            shown.append((image, sample.prompt))
        return {"summary": str(dataset.summary(batch_size=request.loop.batch_size)), "samples": shown}

    # --- outputs and generation ------------------------------------------------------------------
    def outputs(self) -> list[OutputFile]:
        found = []
        for kind, folder in self.workspace.result_folders().items():
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() not in (".safetensors", ".pt") or not path.is_file():
                    continue
                if path.name == RunFolder.RESUME_NAME or _RUN_SUBFOLDERS & set(path.relative_to(folder).parts[:-1]):
                    continue
                if RunFolder.is_archived_result(path):  # an earlier run kept aside (OUT/embedding/NAME.1/)
                    continue
                stat = path.stat()
                found.append(OutputFile(kind, path.stem, path, stat.st_size, stat.st_mtime))
        return found

    def result_files(self) -> list[ResultFile]:
        """The outputs that generation can apply (each method's results)."""
        kinds = registered()
        return [ResultFile(o.kind, o.name, o.path) for o in self.outputs() if o.kind in kinds]

    def usable_names(self) -> list[str]:
        """How a prompt uses each result: an embedding by its name, others by their tag (<lora:NAME:1>)."""
        specs = registered()
        names = []
        for output in self.outputs():
            spec = specs.get(output.kind)
            if spec is not None:
                names.append(output.name if spec.prompt_tag is None else f"<{spec.prompt_tag}:{output.name}:1>")
        return sorted(set(names))

    def generate(
        self,
        settings: SampleSettings,
        on_step: Callable[[int, int], None] | None = None,
        aesthetic: AestheticRequest | None = None,
    ) -> tuple[Image.Image, list[str]]:
        """One image, with the results the prompt asks for applied (embeddings by name, <lora:NAME:0.8>,
        ...) and the `aesthetic` embedding if any; returns the image and what was applied. Refused
        while a job runs."""
        self.jobs.ensure_idle()
        with _generation_lock, self.workspace.session(), torch.no_grad():
            model = self.workspace.model()
            prompts = [settings.prompt, settings.negative_prompt]
            with (
                results_applied(model, prompts, self.result_files()) as applied,
                self.aesthetic.applied(model, aesthetic) as aesthetic_params,
            ):
                prompt, negative = applied.prompts
                image = generate(
                    model,
                    dataclasses.replace(settings, prompt=prompt, negative_prompt=negative),
                    applied.embeddings,
                    on_step,
                )
                used = list(applied.used)
                if aesthetic_params:
                    used.append(f"aesthetic {aesthetic_params['Aesthetic embedding']}")
                return image, used


_generation_lock = threading.Lock()
MERGE_KIND = "merge"  # the standalone outputs' folder of merge-tool results: OUT/merge/
_RUN_SUBFOLDERS = {"checkpoints", "previews", "latent-cache"}  # a run folder's parts that are not results


class StandaloneWorkspace(Workspace):
    """The standalone app: one checkpoint file, outputs under one folder (OUT/KIND/NAME/; the merge
    tools' outputs in OUT/merge/)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        outputs: str | os.PathLike[str],
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.root = Path(outputs)
        self.device = device
        self.dtype = dtype
        self._model: DiffusionModel | None = None
        self._lock = threading.Lock()

    def model(self) -> DiffusionModel:
        with self._lock:
            if self._model is None:
                from lib_training.devices import pick_device, pick_dtype
                from lib_training.model.standalone import load_model

                device = pick_device(self.device)
                self._model = load_model(self.checkpoint, device=device, dtype=pick_dtype(self.dtype, device))
            return self._model

    def describe_model(self) -> str:
        return str(self.checkpoint)

    def model_identity(self) -> dict[str, str]:
        """The checkpoint's name, and the first 10 hex digits of its sha256 (A1111's short hash) if
        the hash is already known from an earlier merge or run (it is not computed here)."""
        identity = {"sd_checkpoint_name": self.checkpoint.stem}
        known = cached_sha256(self.checkpoint)
        if known:
            identity["sd_checkpoint"] = known[:10]
        return identity

    def run_folder(self, spec: MethodSpec, name: str) -> Path:
        return self.root / spec.kind / name

    def result_folders(self) -> dict[str, Path]:
        return {**{kind: self.root / kind for kind in registered()}, MERGE_KIND: self.root / MERGE_KIND}

    def model_folders(self) -> dict[str, list[Path]]:
        """The checkpoint's folder for every kind, and OUT/merge/ (merge outputs) for checkpoints and LoRAs."""
        here, merged = self.checkpoint.parent, self.root / MERGE_KIND
        return {"checkpoints": [here, merged], "loras": [here, merged], "vaes": [here]}

    def merge_output_folder(self, kind: str) -> Path:
        """OUT/merge/ for merged checkpoints and LoRAs alike."""
        return self.root / MERGE_KIND

    def aesthetic_folders(self) -> list[Path]:
        """OUT/aesthetic/."""
        return [self.root / "aesthetic"]
