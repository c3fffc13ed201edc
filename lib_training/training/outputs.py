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
"""

from __future__ import annotations

import csv
import io
import json
import os
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
