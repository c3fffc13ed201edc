"""The host's own tokenization, seen as our `Tokenizer`.

A1111's text wrappers (`FrozenCLIPEmbedderWithCustomWords` and its OpenCLIP siblings) and Forge's
`ClassicTextProcessingEngine` both have `tokenize(texts) -> list[list[int]]` (no BOS/EOS) and the
ids `id_start`, `id_end`, `id_pad`. Using them means prompts split into exactly the tokens the
host uses when it generates (its HF or OpenCLIP tokenizer, its text cleaning).
"""

from __future__ import annotations

from typing import Any


class HostTokenizer:
    """`lib_training.model.diffusion.Tokenizer` over a host text wrapper or text-processing engine."""

    def __init__(self, host: Any, comma_backtrack: int = 20) -> None:
        self.host = host
        self.comma_backtrack = comma_backtrack  # A1111's "Prompt word wrap length limit"; Forge's is 20
        self.bos_id = int(host.id_start)
        self.eos_id = int(host.id_end)
        self.pad_id = int(host.id_pad)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids = self._cache.get(text)
        if ids is None:
            ids = [int(i) for i in self.host.tokenize([text])[0]]
            if len(self._cache) < 4096:
                self._cache[text] = ids
        return list(ids)

    def __repr__(self) -> str:
        return f"HostTokenizer({type(self.host).__name__}, pad_id={self.pad_id})"
