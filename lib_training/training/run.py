"""Running a training job: checks, dataset, trainer; what the CLI, UI and API all call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from lib_training.dataset import DatasetConfig, TrainingDataset
from lib_training.errors import ConfigError
from lib_training.model.diffusion import DiffusionModel
from lib_training.options import to_dict
from lib_training.training.config import LoopConfig
from lib_training.training.method import TrainingMethod
from lib_training.training.outputs import RunFolder
from lib_training.training.progress import Progress
from lib_training.training.trainer import Trainer, TrainingResult


def prepare_dataset(method: TrainingMethod, data: DatasetConfig, loop: LoopConfig) -> TrainingDataset:
    """The dataset, validated up front (every bad file named), its seed the run's seed."""
    return TrainingDataset(dataclasses.replace(data, seed=loop.seed), name=method.name)


def train(
    model: DiffusionModel,
    method: TrainingMethod,
    data: DatasetConfig | TrainingDataset,
    loop: LoopConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    model_title: str = "",
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache_dir: Path | None = None,
    result_dir: Path | None = None,
    file_metadata: dict[str, str] | None = None,
) -> TrainingResult:
    """Train `method` on `model`; results go to the folder `out` (see `RunFolder`).

    `model_title` names the model in the run's config.json (a checkpoint path, a WebUI's model title);
    `result_dir` puts the result file there instead of in `out` (a WebUI's embeddings folder);
    `file_metadata` goes into every file saved (the WebUIs show `sd_checkpoint` and
    `sd_checkpoint_name`: the hash and name of the model it was trained on).

    An existing result of the same name is only replaced with `overwrite` (the earlier run is kept,
    numbered: `RunFolder.begin`), or continued with `resume`. Raises `UserError`s for bad settings,
    data or outputs before any work is done.
    """
    folder = RunFolder(out, method.name, method.suffix, result_dir)
    problem = folder.start_problem(overwrite, resume)
    if problem:
        raise ConfigError(problem)
    dataset = data if isinstance(data, TrainingDataset) else prepare_dataset(method, data, loop)
    method.check_dataset(dataset)
    record = {"loop": to_dict(loop), "data": to_dict(dataset.config), "model": {"title": model_title}}
    if cache_dir is None:
        cache_dir = Path(out) / "latent-cache"  # used by the options that cache on disk
    trainer = Trainer(
        model,
        method,
        dataset,
        loop,
        folder,
        settings=record,
        on_progress=on_progress,
        should_stop=should_stop,
        cache_dir=cache_dir,
        file_metadata=file_metadata,
    )
    return trainer.run(resume=resume)
