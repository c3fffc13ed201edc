"""The output folder of a training run, and every file in it.

    OUT/NAME.safetensors              the result (the newest good state)
    OUT/checkpoints/NAME-STEP.*       numbered copies every `save_every` steps
    OUT/previews/NAME-STEP.png        preview images (prompt and settings in the PNG's text)
    OUT/loss.csv, OUT/loss.png        loss per step, and its plot
    OUT/config.json                   every setting used
    OUT/resume.pt                     what `--resume` continues from (step, optimizer, data order)

A WebUI keeps the result elsewhere (`result_dir`: its embeddings folder, which it loads from)
and everything else in OUT, a log folder the WebUI does not scan.

Every file is written to a temporary name and renamed, so an interrupted write never leaves half a
file and never destroys the previous one.

Nothing of an earlier run is ever deleted: a new run (not a resume) in a folder that holds an
earlier one first moves that folder aside to OUT.1 (OUT.2, ... the first free number), together with
a copy of its result when the result is kept elsewhere, so the earlier previews, loss.csv and result
stay as they were. Only the latent cache moves back (it is a cache, not work). A run that fails or
is stopped before it saved anything removes what it wrote and moves the earlier run back (`discard`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from lib_training.errors import UserError
from lib_training.formats.atomic import OutputError, atomic_path, write_bytes, write_text
from lib_training.training.plot import plot_loss

RESUME_VERSION = 1


@dataclass(frozen=True)
class LossRecord:
    step: int
    loss: float
    lr: float
    epoch: int
    seconds: float


class RunFolder:
    RESUME_NAME = "resume.pt"

    def __init__(
        self,
        root: str | os.PathLike[str],
        name: str,
        suffix: str,
        result_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.name = name
        self.suffix = suffix
        self.result_dir = self.root if result_dir is None else Path(result_dir)
        self.archived: Path | None = None  # where `begin` moved an earlier run
        self._created = False  # `begin` made the folder (so `discard` may remove it)
        self._result_copy: Path | None = None  # the copy of an earlier result kept elsewhere

    LATENT_CACHE = "latent-cache"

    @staticmethod
    def is_archived_result(path: Path) -> bool:
        """Whether `path` is the result inside a run folder moved aside (OUT/NAME.3/NAME.safetensors)."""
        return re.fullmatch(re.escape(path.stem) + r"\.\d+", path.parent.name) is not None

    def start_problem(self, overwrite: bool, resume: bool) -> str | None:
        """Why a run cannot start here (an existing result not to be replaced, nothing to resume), or None."""
        if resume:
            if not self.resume_state.exists():
                return f"nothing to resume: {self.resume_state} does not exist. Start without resuming."
            return None
        if self.result.exists() and not overwrite:
            return (
                f"{self.result} already exists. Choose another name or output folder, resume the run, or allow "
                "overwriting (the earlier run is then kept beside it, numbered)."
            )
        return None

    def _free_archive_name(self) -> Path:
        number = 1
        while (candidate := self.root.with_name(f"{self.root.name}.{number}")).exists():
            number += 1
        return candidate

    def begin(self, resume: bool = False) -> None:
        """Make the folder ready for a run; an earlier run in it is moved aside first (see the module
        docstring) unless the run continues it. Raises OutputError if the folder cannot be written."""
        self.archived = self._result_copy = None
        if not resume:
            earlier = self.root.is_dir() and any(self.root.iterdir())
            earlier_result = self.result_dir != self.root and self.result.is_file()
            if earlier or earlier_result:
                archive = self._free_archive_name()
                try:
                    if earlier:
                        os.replace(self.root, archive)
                    else:
                        archive.mkdir(parents=True)
                    if earlier_result:
                        self._result_copy = archive / self.result.name
                        shutil.copy2(self.result, self._result_copy)
                    cache = archive / self.LATENT_CACHE
                    if cache.is_dir():
                        self.root.mkdir(parents=True, exist_ok=True)
                        os.replace(cache, self.root / self.LATENT_CACHE)
                except OSError as error:
                    raise OutputError(
                        f"cannot keep the earlier run in {self.root} as {archive}: {error.strerror or error}. "
                        "Choose another name or output folder."
                    ) from error
                self.archived = archive
        self._created = not self.root.exists()
        self.prepare()

    def discard(self) -> None:
        """Undo `begin` for a run that saved nothing: remove the folder it made (a new run's) and move the
        earlier run back. A resumed run's folder is left alone."""
        if self.archived is not None:
            cache = self.root / self.LATENT_CACHE
            if cache.is_dir() and not (self.archived / self.LATENT_CACHE).exists():
                os.replace(cache, self.archived / self.LATENT_CACHE)
            if self._result_copy is not None:
                self._result_copy.unlink(missing_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)
            if any(self.archived.iterdir()):
                os.replace(self.archived, self.root)
            else:
                self.archived.rmdir()
            self.archived = self._result_copy = None
        elif self._created:
            shutil.rmtree(self.root, ignore_errors=True)
        self._created = False

    @property
    def result(self) -> Path:
        return self.result_dir / f"{self.name}{self.suffix}"

    def checkpoint(self, step: int) -> Path:
        return self.root / "checkpoints" / f"{self.name}-{step}{self.suffix}"

    def preview(self, step: int) -> Path:
        return self.root / "previews" / f"{self.name}-{step:06d}.png"

    @property
    def loss_csv(self) -> Path:
        return self.root / "loss.csv"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def resume_state(self) -> Path:
        return self.root / self.RESUME_NAME

    def prepare(self) -> None:
        """Create the folder (and the result's, if elsewhere), or say clearly why one cannot be written."""
        for folder in dict.fromkeys((self.root, self.result_dir)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / ".write-test"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                raise OutputError(
                    f"cannot write to the output folder {folder}: {error.strerror or error}. "
                    "Choose another folder, or fix its permissions."
                ) from error

    def write_config(self, settings: dict[str, Any]) -> None:
        write_text(self.config, json.dumps(settings, indent=2, sort_keys=False) + "\n")

    def write_losses(self, records: Sequence[LossRecord]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", "loss", "lr", "epoch", "seconds"])
        for r in records:
            writer.writerow([r.step, f"{r.loss:.6g}", f"{r.lr:.6g}", r.epoch, f"{r.seconds:.3f}"])
        write_text(self.loss_csv, buffer.getvalue())
        image = plot_loss([r.step for r in records], [r.loss for r in records], title=f"{self.name}: loss")
        self.save_png(self.loss_plot, image)

    @staticmethod
    def save_png(path: Path, image: Image.Image, text: dict[str, str] | None = None) -> None:
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        write_bytes(path, buffer.getvalue())

    def save_resume_state(self, state: dict[str, Any]) -> None:
        with atomic_path(self.resume_state) as tmp:
            torch.save({"version": RESUME_VERSION, **state}, tmp)

    def load_resume_state(self) -> dict[str, Any]:
        path = self.resume_state
        if not path.exists():
            raise UserError(f"nothing to resume: {path} does not exist. Start without --resume.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"cannot resume from {path}: {error}. Start again without --resume.") from error
        if not isinstance(state, dict) or state.get("version") != RESUME_VERSION:
            raise UserError(f"{path} is not a resume state of this version. Start again without --resume.")
        return state
