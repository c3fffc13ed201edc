"""Making an aesthetic embedding: the mean CLIP image feature of a folder of images.

As the extension does: every image goes through the CLIP model's preprocessing (resize the short
side, centre crop, normalise) and image tower; the raw (unnormalised) features [N, D] are averaged
into [1, D] and saved (`embedding_file.save_embedding`). Images are read in batches, with progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lib_training.aesthetic.clip_model import ClipSource, load_clip_model
from lib_training.aesthetic.embedding_file import save_embedding
from lib_training.dataset.images import relative_name, scan_folder
from lib_training.errors import ConfigError, UserError
from lib_training.training.progress import Progress

ProgressCallback = Callable[[Progress], None]


class CancelledError(UserError):
    """The user stopped the job; nothing was written."""


@dataclass(frozen=True)
class CreateResult:
    result: Path
    images: int
    width: int
    seconds: float


def check_name(name: str) -> str:
    name = name.strip()
    if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise ConfigError(f'{name!r} is not a usable file name; give a name without / \\ : * ? " < > |')
    return name


def readable_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The folder's images (recursively, sorted); a UserError naming any that cannot be read."""
    scan = scan_folder(Path(folder))
    broken: list[str] = []
    for path in scan.images:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # PIL raises many kinds for damaged or mislabelled files
            broken.append(relative_name(path, scan.root))
    if broken:
        listed = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise UserError(
            f"{len(broken)} of {len(scan.images)} images in {scan.root} cannot be read ({listed}); "
            "remove or re-save them and try again"
        )
    return scan.images


@torch.no_grad()
def mean_image_features(
    paths: list[Path],
    source: ClipSource,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The mean of the raw image features of `paths` under the CLIP model: [1, D] float32 on the CPU."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1 (got {batch_size})")
    if on_progress:
        on_progress(Progress("loading CLIP", 0, 0, message=source.describe()))
    model, preprocess = load_clip_model(source, device)
    total = torch.zeros(1, dtype=torch.float64)
    done, start = 0, time.perf_counter()
    for first in range(0, len(paths), batch_size):
        if should_stop and should_stop():
            raise CancelledError("stopped before the end; no embedding was written")
        batch = []
        for path in paths[first : first + batch_size]:
            with Image.open(path) as image:
                batch.append(preprocess(image.convert("RGB")))
        pixels = torch.stack(batch).to(device)  # [b, 3, S, S]
        features = model.encode_image(pixels).double().cpu()  # [b, D], raw as get_image_features gives them
        total = total + features.sum(dim=0, keepdim=True)
        done += len(batch)
        if on_progress:
            elapsed = time.perf_counter() - start
            speed = done / elapsed if elapsed > 0 else None
            eta = (len(paths) - done) / speed if speed else None
            on_progress(Progress("encoding images", done, len(paths), steps_per_second=speed, eta_seconds=eta))
    return (total / done).float()


def create_embedding(
    data: str | os.PathLike[str],
    name: str,
    out: str | os.PathLike[str],
    source: ClipSource | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CreateResult:
    """Write OUT/NAME.pt, the aesthetic embedding of the images in `data`. Every input is checked
    (name, output, images, CLIP model and weights file) before the model is loaded."""
    source = source or ClipSource()
    name = check_name(name)
    target = Path(out) / f"{name}.pt"
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; choose another name or allow overwriting")
    source.check()
    paths = readable_images(data)
    start = time.perf_counter()
    features = mean_image_features(paths, source, batch_size, device, on_progress, should_stop)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_embedding(target, features)
    if on_progress:
        on_progress(Progress("done", len(paths), len(paths), message=str(target)))
    return CreateResult(target, len(paths), int(features.shape[1]), time.perf_counter() - start)
