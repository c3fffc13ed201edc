"""CLIP's byte-pair tokenizer, from the vocabulary bundled with open_clip (nothing is downloaded)."""

from __future__ import annotations

from functools import lru_cache

from open_clip.tokenizer import SimpleTokenizer

BOS_ID = 49406  # <start_of_text>
EOS_ID = 49407  # <end_of_text>
OPEN_CLIP_PAD_ID = 0  # OpenCLIP towers (SD2's ViT-H, SDXL's bigG) pad with "!"; CLIP-L pads with EOS


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    """The process-wide open_clip tokenizer (building its merge table takes about a second)."""
    return SimpleTokenizer()


@lru_cache(maxsize=4096)
def _encode(text: str) -> tuple[int, ...]:
    return tuple(_bpe().encode(text))


class ClipTokenizer:
    """CLIP BPE tokenizer implementing `lib_training.model.diffusion.Tokenizer`.

    `encode` cleans the text as open_clip does (fixes mojibake, collapses whitespace, lowercases)
    and returns the ids without BOS/EOS. `pad_id` is what fills a chunk after EOS: `EOS_ID` for
    OpenAI's CLIP-L (SD1, SDXL's first encoder), `OPEN_CLIP_PAD_ID` for the OpenCLIP towers.
    """

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    comma_backtrack: int = 20  # the WebUIs' default ("Prompt word wrap length limit")

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return list(_encode(text))

    def __repr__(self) -> str:
        return f"ClipTokenizer(pad_id={self.pad_id})"
