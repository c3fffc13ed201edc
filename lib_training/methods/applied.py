"""Results used at generation time, the way a prompt asks for them.

Results of a method with a prompt tag are applied where a prompt names them, with the hosts'
syntax: `<lora:NAME:0.8>` (strength 0.8; `<lora:NAME>` means 1). The tag is removed from the
prompt. Results of a method without a tag (embeddings) are all offered, and a prompt uses one by
writing its name. Each is loaded through its method's `load` and applied with its
`apply_for_generation`, and everything is undone on exit.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_training.errors import CheckpointError, UserError
from lib_training.methods import for_prompt_tag, registered
from lib_training.model.diffusion import DiffusionModel

_TAG = re.compile(r"<(\w+):([^:<>]+)(?::([^:<>]*))?>")


@dataclass(frozen=True)
class ResultFile:
    kind: str  # the method's kind
    name: str
    path: Path


@dataclass(frozen=True)
class PromptTag:
    tag: str  # "lora"
    name: str
    strength: float


def split_tags(prompt: str) -> tuple[str, list[PromptTag]]:
    """(the prompt without tags of registered methods, those tags); other tags stay in the prompt."""
    found: list[PromptTag] = []

    def take(match: re.Match[str]) -> str:
        tag, name, strength = match.group(1), match.group(2).strip(), match.group(3)
        if for_prompt_tag(tag) is None:
            return match.group(0)
        try:
            value = 1.0 if strength in (None, "") else float(strength)
        except ValueError:
            raise UserError(
                f"the strength in {match.group(0)!r} is not a number; write e.g. <{tag}:{name}:0.8>"
            ) from None
        found.append(PromptTag(tag, name, value))
        return ""

    return _TAG.sub(take, prompt).strip(), found


@dataclass
class Applied:
    prompts: list[str]  # the prompts without the tags
    embeddings: dict[str, Any]  # textual-inversion vectors by name
    used: list[str]  # what was applied, for a result line ("lora:NAME:0.8", "embedding:NAME")


@contextlib.contextmanager
def results_applied(model: DiffusionModel, prompts: Sequence[str], files: Sequence[ResultFile]) -> Iterator[Applied]:
    """Apply what `prompts` ask for from `files` to `model` while inside (see the module docstring)."""
    specs = registered()
    cleaned, tags = [], []
    for prompt in prompts:
        text, found = split_tags(prompt)
        cleaned.append(text)
        tags += found
    with contextlib.ExitStack() as stack:
        embeddings: dict[str, Any] = {}
        used: list[str] = []
        loaded = []
        for tag in dict.fromkeys(tags):
            spec = for_prompt_tag(tag.tag)
            match = [f for f in files if spec is not None and f.kind == spec.kind and f.name == tag.name]
            if not match:
                raise UserError(
                    f"there is no {tag.tag} named {tag.name!r} in the outputs; check the name in the prompt"
                )
            if tag.strength == 0:
                continue  # strength 0: the file is found, but nothing is applied (the model stays exact)
            loaded.append((tag, spec.method.load(match[0].path, model)))
        # Applied last to first: hooks applied later wrap those applied earlier and so see a layer's
        # input first, which makes the first tag's result act first, as in A1111 (hypernetworks chain).
        for tag, method in reversed(loaded):
            embeddings.update(stack.enter_context(method.apply_for_generation(model, tag.strength)))
        used += [f"{tag.tag}:{tag.name}:{tag.strength:g}" for tag, _ in loaded]
        words = " ".join(cleaned)
        for file in files:
            spec = specs.get(file.kind)
            if spec is None or spec.prompt_tag is not None or file.name in embeddings:
                continue
            if not re.search(rf"(?<![\w]){re.escape(file.name)}(?![\w])", words):
                continue  # offered by name, but not named in these prompts
            try:
                method = spec.method.load(file.path, model)
            except CheckpointError:
                continue  # e.g. an embedding made for another model family
            embeddings.update(stack.enter_context(method.apply_for_generation(model, 1.0)))
            used.append(f"{file.kind}:{file.name}")
        yield Applied(cleaned, embeddings, used)
