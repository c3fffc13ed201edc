"""What a training method is, to the trainer: parameters that train, attach/detach, save.

The trainer knows nothing else about a method. An embedding method adds vectors to prompts;
a hypernetwork or LoRA method hooks into modules on `attach` and must remove every hook on
`detach`, which the trainer calls in `finally`, so the host's model is as before whatever happens.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lib_training.dataset import TrainingDataset
from lib_training.interface import DiffusionModel, EmbeddingVectors


class TrainingMethod(ABC):
    kind: str  # "embedding", "hypernetwork", "lora", ...
    suffix: str = ".safetensors"  # of the result file

    def __init__(self, name: str) -> None:
        self.name = name  # the result's name: its file name and, for embeddings, its prompt token

    @abstractmethod
    def attach(self, model: DiffusionModel) -> None:
        """Create the trainable parameters for `model` and hook them in."""

    @abstractmethod
    def detach(self) -> None:
        """Remove everything `attach` added to the model. Must be safe to call more than once."""

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (fp32)."""

    def check_dataset(self, dataset: TrainingDataset) -> None:  # noqa: B027  (optional for subclasses)
        """Raise a UserError if this method cannot train on `dataset` (before any work is done)."""

    def prompt_embeddings(self) -> Mapping[str, EmbeddingVectors]:
        """Textual-inversion vectors to use in prompts, by name (none for most methods)."""
        return {}

    @abstractmethod
    def save(self, path: Path, step: int, metadata: Mapping[str, str]) -> None:
        """Write the result as the hosts load it, atomically."""

    def state_dict(self) -> dict[str, Tensor]:
        """Trainable values for resuming (by default, the parameters in order)."""
        return {str(i): p.detach().clone() for i, p in enumerate(self.parameters())}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        params = self.parameters()
        if len(state) != len(params):
            raise ValueError(f"resume state has {len(state)} tensors, the method has {len(params)}")
        for i, param in enumerate(params):
            param.data.copy_(state[str(i)])

    def describe(self) -> dict[str, Any]:
        """Settings of this method for config.json and the file's metadata."""
        return {"kind": self.kind, "name": self.name}

    @contextlib.contextmanager
    def attached(self, model: DiffusionModel) -> Iterator[None]:
        try:
            self.attach(model)
            yield
        finally:
            self.detach()
