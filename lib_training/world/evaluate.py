"""How well a model draws the tiny world: generate pictures for prompts, let the classifier name them.

Pictures come from `lib_training.model.sampler.generate` (20 Euler steps, CFG 5 by default), one seed
per picture, so the figures are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lib_training.model.diffusion import DiffusionModel, EmbeddingVectors
from lib_training.model.sampler import SampleSettings, generate
from lib_training.world.classifier import Judgement, SceneClassifier, judge
from lib_training.world.scenes import SIDE, to_tensor

STEPS = 20
CFG = 5.0


@dataclass(frozen=True)
class Expectation:
    """A prompt and what its pictures should show (None: not judged)."""

    prompt: str
    shape: str | None = None
    colour: str | None = None
    background: str | None = None


@dataclass(frozen=True)
class Score:
    shape: float | None  # fraction of pictures with the expected shape (None: no shape expected)
    colour: float | None
    background: float | None
    both: float | None  # fraction with the expected shape and colour together
    count: int

    def describe(self) -> str:
        parts = [f"{name} {value:.0%}" for name, value in self.__dict__.items() if isinstance(value, float)]
        return ", ".join(parts) + f" of {self.count}"


def draw(
    model: DiffusionModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    embeddings: Mapping[str, EmbeddingVectors] | None = None,
    steps: int = STEPS,
    cfg: float = CFG,
) -> torch.Tensor:
    """One picture per (prompt, seed) pair, [N, 3, 64, 64] in [-1, 1]."""
    images = [
        generate(model, SampleSettings(prompt, "", seed, steps, cfg, SIDE, SIDE, "euler"), embeddings)
        for prompt, seed in zip(prompts, seeds)
    ]
    return to_tensor(images)


def score(judged: Sequence[Judgement], expected: Sequence[Expectation]) -> Score:
    def rate(names: tuple[str, ...]) -> float | None:
        pairs = [(j, e) for j, e in zip(judged, expected) if all(getattr(e, n) is not None for n in names)]
        if not pairs:
            return None
        return sum(all(getattr(j, n) == getattr(e, n) for n in names) for j, e in pairs) / len(pairs)

    return Score(rate(("shape",)), rate(("colour",)), rate(("background",)), rate(("shape", "colour")), len(judged))


def evaluate(
    model: DiffusionModel,
    classifier: SceneClassifier,
    expected: Sequence[Expectation],
    seeds: Sequence[int],
    embeddings: Mapping[str, EmbeddingVectors] | None = None,
) -> Score:
    """Draw each expectation's prompt once per seed and score what the classifier sees."""
    prompts = [e.prompt for e in expected for _ in seeds]
    all_seeds = [s for _ in expected for s in seeds]
    images = draw(model, prompts, all_seeds, embeddings)
    return score(judge(classifier, images), [e for e in expected for _ in seeds])
