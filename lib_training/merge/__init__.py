"""Checkpoint merging and LoRA tools, streaming tensor by tensor.

- `merge(MergeConfig(...))`: weighted sum, add difference, TIES, DARE, ... (see `methods`).
- `bake_loras(LoraBakeConfig(...))`, `extract_lora(LoraExtractConfig(...))`,
  `resize_lora(LoraResizeConfig(...))`.

Each takes `progress=` (called with `WriteProgress`) and `cancel=` (a `threading.Event` or a function
returning True once cancelled); a cancelled operation raises `CancelledError` and leaves no file.
"""

from __future__ import annotations

from lib_training.merge.config import (
    LoraBakeConfig,
    LoraExtractConfig,
    LoraResizeConfig,
    LoraSpec,
    MergeConfig,
)
from lib_training.merge.engine import MergeResult, merge
from lib_training.merge.lora_bake import BakeResult, bake_loras
from lib_training.merge.lora_extract import LoraResult, extract_lora
from lib_training.merge.lora_resize import resize_lora
from lib_training.merge.methods import MERGE_METHODS
from lib_training.merge.progress import CancelledError, WriteProgress

__all__ = [
    "MERGE_METHODS",
    "BakeResult",
    "CancelledError",
    "LoraBakeConfig",
    "LoraExtractConfig",
    "LoraResizeConfig",
    "LoraResult",
    "LoraSpec",
    "MergeConfig",
    "MergeResult",
    "WriteProgress",
    "bake_loras",
    "extract_lora",
    "merge",
    "resize_lora",
]
