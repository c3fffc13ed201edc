"""Frozen text encoders' outputs per prompt, kept in memory and optionally on disk.

When a method does not train the text encoders, a prompt's conditioning never changes during a run,
so each prompt is encoded once, alone, and its output reused. `fill` encodes every prompt a run can
use before the first step; from then on the encoders are not needed at all, and the trainer moves
them off the GPU (`DiffusionModel.offloaded`). Without `fill` prompts are encoded as
they come (and kept, up to `limit` of them).

Prompts of one batch that need different numbers of 75-token chunks are padded to the longest with
the output of an empty chunk. That is what encoding them together computes (the WebUIs encode each
chunk on its own, `lib_training.model.prompt`, and pad with empty chunks), so a batch never needs
the encoders again, and a run gives the same numbers whether its prompts were cached up front or not.

On disk the outputs of one set of text encoders live in one safetensors file,
`text-<fingerprint>.safetensors`, tensors `<sha256 of the prompt>.context` and `.pooled`; the
fingerprint covers the encoders' weights and settings (clip skip), so other encoders never read it.
New prompts rewrite the file whole (temporary file, then rename); an unreadable file counts as empty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from einops import repeat
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor

from lib_training.formats.atomic import write_bytes
from lib_training.formats.fingerprint import weights_fingerprint
from lib_training.model.diffusion import Conditioning, DiffusionModel, SizeConditioning
from lib_training.model.prompt import CONTEXT_TOKENS

FORMAT_VERSION = 1
LAZY_LIMIT = 4096  # prompts kept when encoded as they come (a run that draws new prompts forever)
MAX_PROMPTS = 20_000  # prompts `fill` may be given (kept in CPU memory: SD1 ~120 kB, SDXL ~320 kB each)

Entry = tuple[Tensor, "Tensor | None"]  # context [1, 77 * chunks, C], pooled [1, P] or None; on the CPU
Progress = Callable[[int, int], None]  # (prompts cached so far, prompts in total)


class TextNotCachedError(RuntimeError):
    """A prompt was asked for after `fill` that `fill` was not given (the encoders may be away)."""


class TextOutputCache:
    """The conditioning of prompts under frozen text encoders; see the module docstring."""

    def __init__(self, model: DiffusionModel, disk_dir: Path | None = None, limit: int = LAZY_LIMIT) -> None:
        self.model = model
        self.limit = limit
        self.disk_path = None
        if disk_dir is not None:
            self.disk_path = Path(disk_dir) / f"text-{encoders_fingerprint(model)}.safetensors"
        self.complete = False  # filled: every prompt of the run is here, and only these may be asked for
        self._entries: dict[str, Entry] = {}

    # --- filling ----------------------------------------------------------------------------------
    def fill(self, prompts: Iterable[str], progress: Progress | None = None) -> None:
        """Encode every prompt not cached yet (from disk where it is there), and the empty prompt that
        pads; afterwards only these prompts may be asked for. Call under the run's autocast."""
        wanted = list(dict.fromkeys(["", *prompts]))
        missing = [prompt for prompt in wanted if prompt not in self._entries]
        on_disk = self._load_disk() if missing else {}
        for prompt in missing:
            key = prompt_key(prompt)
            if f"{key}.context" in on_disk:
                self._entries[prompt] = self._kept(on_disk[f"{key}.context"], on_disk.get(f"{key}.pooled"))
        missing = [prompt for prompt in missing if prompt not in self._entries]
        done = len(wanted) - len(missing)
        if progress is not None:
            progress(done, len(wanted))
        for prompt in missing:
            self._entries[prompt] = self._encode(prompt)
            done += 1
            if progress is not None and (done % 16 == 0 or done == len(wanted)):
                progress(done, len(wanted))
        if missing:
            self._write_disk(on_disk)
        self.complete = True

    def _encode(self, prompt: str) -> Entry:
        with torch.no_grad():
            encoded = self.model.encode_prompts([prompt])
        return self._kept(encoded.context, encoded.pooled)

    def _kept(self, context: Tensor, pooled: Tensor | None) -> Entry:
        """An entry as kept: in CPU memory (a long run's prompts would crowd the GPU), pinned for a GPU
        model so that each batch's copy to the GPU runs without waiting."""
        pin = self.model.device.type == "cuda"

        def kept(tensor: Tensor) -> Tensor:
            tensor = tensor.detach().cpu()
            return tensor.pin_memory() if pin else tensor

        return kept(context), None if pooled is None else kept(pooled)

    def _entry(self, prompt: str) -> Entry:
        found = self._entries.get(prompt)
        if found is not None:
            return found
        if self.complete:
            raise TextNotCachedError(f"the prompt {prompt!r} was not among the prompts cached before training")
        found = self._encode(prompt)
        if len(self._entries) < self.limit:
            self._entries[prompt] = found
        return found

    # --- reading ----------------------------------------------------------------------------------
    def conditioning(self, prompts: Sequence[str], sizes: Sequence[SizeConditioning] | None = None) -> Conditioning:
        """The batch's conditioning on the model's device, as `DiffusionModel.encode_prompts` gives it."""
        model = self.model
        entries = [self._entry(prompt) for prompt in prompts]
        chunks = max(context.shape[1] // CONTEXT_TOKENS for context, _ in entries)
        context = torch.cat([self._padded(self._on_device(context), chunks) for context, _ in entries])
        if not model.family.is_sdxl:
            return Conditioning(context)  # [B, 77 * chunks, C]
        pooled = torch.cat([self._on_device(p) for _, p in entries if p is not None])  # [B, P]
        if sizes is None:
            side = model.family.default_size
            sizes = [SizeConditioning((side, side))] * len(prompts)
        return Conditioning(context, model.size_vector(pooled, sizes), pooled)

    def _on_device(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.model.device, non_blocking=True)

    def _padded(self, context: Tensor, chunks: int) -> Tensor:
        """context [1, 77 * n, C] followed by empty chunks up to [1, 77 * chunks, C]."""
        missing = chunks - context.shape[1] // CONTEXT_TOKENS
        if missing == 0:
            return context
        empty = self._on_device(self._entry("")[0])  # [1, 77, C]
        return torch.cat([context, repeat(empty, "1 t c -> 1 (n t) c", n=missing)], dim=1)

    # --- disk -------------------------------------------------------------------------------------
    def _load_disk(self) -> dict[str, Tensor]:
        """Every tensor of the disk file; none without one (a damaged file is as good as none: its
        prompts are encoded again and the file rewritten)."""
        if self.disk_path is None or not self.disk_path.is_file():
            return {}
        try:
            return load_file(str(self.disk_path))
        except Exception:
            return {}

    def _write_disk(self, on_disk: dict[str, Tensor]) -> None:
        """The file again: what it held (other runs' prompts stay) and every entry kept here."""
        if self.disk_path is None:
            return
        tensors = dict(on_disk)
        for prompt, (context, pooled) in self._entries.items():
            key = prompt_key(prompt)
            tensors[f"{key}.context"] = context.contiguous()
            if pooled is not None:
                tensors[f"{key}.pooled"] = pooled.contiguous()
        write_bytes(self.disk_path, save_tensors(tensors, metadata={"format": str(FORMAT_VERSION)}))


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def encoders_fingerprint(model: DiffusionModel) -> str:
    """Hex key of everything a prompt's encoding depends on: each text encoder's weights and settings
    (scalar attributes such as clip skip, the tokenizer's comma backtrack), in order."""
    parts = []
    for encoder in model.text_encoders:
        settings = {k: v for k, v in vars(encoder).items() if isinstance(v, (bool, int, float, str))}
        settings["comma_backtrack"] = encoder.tokenizer.comma_backtrack
        weights = weights_fingerprint({encoder.key: model.modules[encoder.key]}) if encoder.key in model.modules else ""
        parts.append({"type": type(encoder).__name__, "settings": settings, "weights": weights})
    text = json.dumps({"format": FORMAT_VERSION, "family": model.family.name, "encoders": parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def text_caching_problem(trains_text_encoders: bool, prompts_vary: bool) -> str | None:
    """Why a run with these settings cannot cache its text encoders' outputs, or None
    (`prompts_vary`: `DatasetConfig.prompts_vary`)."""
    if trains_text_encoders:
        return (
            "cache_text_outputs needs frozen text encoders, and these settings train them (text-encoder LoRA, "
            "a pivotal token or an embedding); turn one or the other off"
        )
    if prompts_vary:
        return (
            "cache_text_outputs needs fixed prompts, and tag shuffle or tag dropout makes new ones every step; "
            "turn those off, or cache_text_outputs off"
        )
    return None
