"""Textual inversion: train new token vectors, one set per text encoder, and nothing else.

The embedding's name is its prompt token: wherever the name appears in a prompt, its vectors take
the place of the name's tokens (`lib_training.model.prompt`). The model stays frozen and untouched; the
vectors are fp32 parameters owned by this method. SDXL trains a `clip_l` and a `clip_g` part
together.

New vectors start from the token embeddings of an initialisation text, its tokens spread over the
vectors (with 4 vectors and "red car" tokens [red, car]: red, red, car, car), as A1111 does.

Defaults: learning rate 0.005 (A1111's), falling along a cosine to 0 at the last step (A1111, kohya
and diffusers keep it constant). At a constant rate the vectors move as much at the end as early on,
so the file a run ends with is a draw from where they wander: on the tiny world (its model of step
32000), the files of one constant-rate run saved every 100 steps from step 300 on showed the taught
concept in 70% to 90% of their pictures, and its last file in 48%; on the shipped model, with the
default 1000 steps (`bench/quality.py --method embedding`), a constant rate ends at 88%, the cosine at
98%.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lib_training.dataset import TrainingDataset
from lib_training.errors import ConfigError
from lib_training.formats.embedding_files import EmbeddingFile, read_embedding, write_embedding
from lib_training.model.diffusion import DiffusionModel, EmbeddingVectors, TextEncoder
from lib_training.options import option
from lib_training.training.method import MethodSettings, MethodSpec, ParamGroup, TrainingMethod

MAX_VECTORS = 75


@dataclass
class EmbeddingConfig(MethodSettings):
    """What to train: a new embedding (or an existing one, continued)."""

    name: str = option(
        help="Name of the embedding: its file name, and the word that calls it in prompts.", flag="--name"
    )
    init_text: str = option(
        "*", "Text whose token embeddings start the vectors (spread over them); empty starts from zeros."
    )
    vectors: int = option(1, "Vectors per token: more can hold more detail, but take prompt space.", min=1, max=75)
    continue_from: str | None = option(
        None, "An existing embedding file to continue training (any WebUI format).", advanced=True
    )
    file_format: str = option("safetensors", "Format of the saved file.", choices=("safetensors", "pt"))
    overwrite: bool = option(False, "Replace an existing embedding of the same name in the output folder.")

    def check(self) -> None:
        if not self.name.strip():
            raise ConfigError("the embedding needs a name")
        super().check()


def initial_vectors(encoder: TextEncoder, init_text: str, count: int) -> Tensor:
    """[count, width] fp32: the init text's token embeddings spread over `count` vectors (zeros if empty)."""
    weight = encoder.token_embedding.weight
    ids = encoder.tokenizer.encode(init_text) if init_text.strip() else []
    if not ids:
        return torch.zeros(count, weight.shape[1], dtype=torch.float32, device=weight.device)
    embedded = weight.detach()[torch.tensor(ids, device=weight.device)].float()  # [tokens, width]
    picks = [i * len(ids) // count for i in range(count)]
    return embedded[picks].clone()


class EmbeddingMethod(TrainingMethod):
    kind = "embedding"
    settings_type = EmbeddingConfig
    settings: EmbeddingConfig

    def __init__(self, settings: EmbeddingConfig) -> None:
        super().__init__(settings)
        self._vectors: dict[str, nn.Parameter] = {}
        self._source: str | None = None

    @property
    def suffix(self) -> str:
        return "." + self.settings.file_format

    def check_dataset(self, dataset: TrainingDataset) -> None:
        missing = [line for line in dataset.template.lines if "[name]" not in line]
        if missing:
            raise ConfigError(
                f"the prompt template {dataset.template.name!r} has lines without [name] (e.g. {missing[0]!r}); "
                "an embedding only learns from prompts that contain its name. Choose a template such as "
                "subject_filewords or style_filewords, or add [name] to every line."
            )

    def attach(self, model: DiffusionModel) -> None:
        expect = {encoder.key: encoder.width for encoder in model.text_encoders}
        start: Mapping[str, Tensor]
        if self.settings.continue_from:
            loaded = read_embedding(self.settings.continue_from, expect=expect)
            start = loaded.vectors
        else:
            if self.settings.vectors > MAX_VECTORS:
                raise ConfigError(f"at most {MAX_VECTORS} vectors per token fit in a prompt chunk")
            start = {
                e.key: initial_vectors(e, self.settings.init_text, self.settings.vectors) for e in model.text_encoders
            }
        device = model.device
        self._vectors = {key: nn.Parameter(t.detach().float().to(device).clone()) for key, t in start.items()}
        self._source = model.family.name

    def detach(self) -> None:
        pass  # nothing was attached to the model: the vectors only enter through prompts

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("embedding", list(self._vectors.values()))]

    def prompt_embeddings(self) -> Mapping[str, EmbeddingVectors]:
        return {self.name: self._vectors}

    def vectors(self) -> dict[str, Tensor]:
        """The current vectors, detached, on the CPU."""
        return {key: p.detach().cpu().clone() for key, p in self._vectors.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return self.vectors()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if set(state) != set(self._vectors):
            raise ValueError(f"resume state has parts {sorted(state)}, the embedding {sorted(self._vectors)}")
        for key, param in self._vectors.items():
            param.data.copy_(state[key])

    def save(self, path: Path, step: int, metadata: Mapping[str, str]) -> None:
        meta = {**metadata, "sd_checkpoint_family": self._source or ""}
        write_embedding(path, EmbeddingFile(self.name, self.vectors(), step, meta), overwrite=True)

    @classmethod
    def load(cls, path: Path, model: DiffusionModel) -> EmbeddingMethod:
        """An embedding file, its vectors on the model's device; its name is the file's stem."""
        expect = {encoder.key: encoder.width for encoder in model.text_encoders}
        loaded = read_embedding(path, expect=expect)
        method = cls(EmbeddingConfig(name=Path(path).stem))
        method._vectors = {
            key: nn.Parameter(v.to(model.device), requires_grad=False) for key, v in loaded.vectors.items()
        }
        method._source = model.family.name
        return method


SPEC = MethodSpec(
    method=EmbeddingMethod,
    title="Textual inversion",
    summary="textual inversion: new prompt words (SD1, SD2, SDXL)",
    result_role="embeddings",
    loop_defaults={"lr": "0.005", "lr_scheduler": "cosine"},
    run_folder_suffix="",
)
