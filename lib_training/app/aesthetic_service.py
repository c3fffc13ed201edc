"""Aesthetic gradients in the app and the WebUIs' API: making embeddings as jobs, and the
generation-time request (which embeddings, which settings, which CLIP model).

Kept apart from `service.py`: `TrainingService.generate` only takes an optional `AestheticRequest`
and enters `AestheticService.applied` around its sampling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_training.aesthetic.clip_model import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipSource
from lib_training.aesthetic.create import CancelledError, check_name, create_embedding
from lib_training.aesthetic.embedding_file import embedding_files, load_embedding
from lib_training.aesthetic.personalise import AestheticSettings, Personalisers, aesthetic_applied
from lib_training.app.jobs import Job, JobContext, JobManager
from lib_training.errors import UserError
from lib_training.model.diffusion import DiffusionModel
from lib_training.options import SettingsError, from_dict, option, to_dict

JOB_KIND = "aesthetic/create"


@dataclass
class CreateConfig:
    """Make an aesthetic embedding: the mean CLIP image feature of a folder of images."""

    data: str = option(help="folder of images (searched recursively)", role="folder", label="Image folder")
    name: str = option(help="name of the embedding (its file name without .pt)")
    out: str = option("", "output folder (empty: the aesthetic embeddings folder)", role="folder")
    clip_model: str = option(DEFAULT_MODEL, "open_clip architecture of the CLIP model", label="CLIP model")
    clip_weights: str = option(
        "", "local weights of the CLIP model in open_clip's layout (empty: download them)", label="CLIP weights file"
    )
    clip_pretrained: str = option(DEFAULT_PRETRAINED, "open_clip's tag of the weights", advanced=True)
    batch_size: int = option(16, "images per batch", min=1, max=1024, advanced=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", advanced=True)
    overwrite: bool = option(False, "replace an existing embedding of that name")

    def clip(self) -> ClipSource:
        return clip_source(self.clip_model, self.clip_weights, self.clip_pretrained)


def clip_source(model: str = DEFAULT_MODEL, weights: str = "", pretrained: str = DEFAULT_PRETRAINED) -> ClipSource:
    return ClipSource(model or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED, Path(weights) if weights else None)


@dataclass(frozen=True)
class AestheticRequest:
    """An aesthetic embedding (or one per SDXL text encoder) to apply at generation, with its settings."""

    embeddings: Sequence[str]  # names in the aesthetic folders, or paths
    settings: AestheticSettings = field(default_factory=AestheticSettings)
    clip: ClipSource = field(default_factory=ClipSource)


class AestheticService:
    """Aesthetic embeddings of a workspace: where they are, making them as jobs, applying them."""

    def __init__(self, folders: Sequence[Path], jobs: JobManager) -> None:
        self.folders = [Path(f) for f in folders]  # the first is where new embeddings go
        self.jobs = jobs
        self.personalisers = Personalisers()

    def names(self) -> list[str]:
        """Embeddings found in the folders (the first folder wins a name)."""
        found: dict[str, Path] = {}
        for folder in reversed(self.folders):
            found.update(embedding_files(folder))
        return sorted(found)

    def resolve(self, text: str) -> Path:
        """The file an embedding name or path means; a UserError naming the folders searched."""
        path = Path(text).expanduser()
        if path.is_file():
            return path
        for folder in self.folders:
            found = embedding_files(folder).get(text)
            if found is not None:
                return found
        searched = ", ".join(str(f) for f in self.folders) or "no folder"
        raise UserError(f"aesthetic embedding {text!r} not found (searched {searched}); give its name or path")

    # --- making --------------------------------------------------------------------------------
    def parse(self, body: Any) -> CreateConfig:
        if not isinstance(body, dict):
            raise SettingsError({"": "the request body must be a JSON object"})
        config = from_dict(CreateConfig, body)
        errors: dict[str, str] = {}
        try:
            check_name(config.name)
        except UserError as error:
            errors["name"] = str(error)
        if not Path(config.data).is_dir():
            errors["data"] = f"folder not found: {config.data}"
        if config.clip_weights and not Path(config.clip_weights).is_file():
            errors["clip_weights"] = f"file not found: {config.clip_weights}"
        if not config.out and not self.folders:
            errors["out"] = "give an output folder"
        if errors:
            raise SettingsError(errors)
        return config

    def start_create(self, body: Any) -> Job:
        """Validate and start making an embedding: SettingsError (invalid), JobBusyError (a job runs)."""
        config = self.parse(body)
        self.jobs.ensure_idle()
        out = Path(config.out) if config.out else self.folders[0]

        def work(context: JobContext) -> dict[str, Any]:
            from lib_training.devices import pick_device

            try:
                result = create_embedding(
                    config.data, config.name, out, config.clip(), config.batch_size, pick_device(config.device),
                    overwrite=config.overwrite, on_progress=context.report, should_stop=context.should_stop,
                )  # fmt: skip
            except CancelledError as error:
                return {"cancelled": True, "message": str(error)}
            return {"result": str(result.result), "images": result.images, "width": result.width}

        return self.jobs.start(JOB_KIND, f"Aesthetic embedding: {config.name}", work, to_dict(config))

    # --- applying --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, model: DiffusionModel, request: AestheticRequest | None) -> Iterator[dict[str, Any]]:
        """While inside, `model` conditions through the request's embeddings; yields the infotext
        parameters (empty without a request or embeddings)."""
        if request is None or not request.embeddings:
            yield {}
            return
        request.settings.check()
        embeddings = [load_embedding(self.resolve(text)) for text in request.embeddings]
        personaliser = self.personalisers.for_model(model, request.clip)
        assigned = personaliser.match(embeddings)
        with aesthetic_applied(personaliser, assigned, request.settings):
            yield request.settings.infotext(", ".join(e.name for e in embeddings))
