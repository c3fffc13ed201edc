"""The training dataset: captioned images -> prompts, image tensors and a resumable batch order.

Knows nothing about models; the VAE appears only as the `encode` callable of `LatentCache`.
"""

from __future__ import annotations

from lib_training.dataset.dataset import Batch, DatasetConfig, ImageRecord, Sample, TrainingDataset
from lib_training.dataset.errors import DatasetError, TemplateError
from lib_training.dataset.images import IMAGE_EXTENSIONS, ImageView
from lib_training.dataset.latent_cache import LatentCache, LatentMode, LatentSampler
from lib_training.dataset.sampler import BatchPlan, BatchSampler
from lib_training.dataset.summary import DatasetSummary
from lib_training.dataset.templates import builtin_templates, load_template

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "BatchPlan",
    "BatchSampler",
    "DatasetConfig",
    "DatasetError",
    "DatasetSummary",
    "ImageRecord",
    "ImageView",
    "LatentCache",
    "LatentMode",
    "LatentSampler",
    "Sample",
    "TemplateError",
    "TrainingDataset",
    "builtin_templates",
    "load_template",
]
