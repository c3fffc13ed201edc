"""Prompts to text-encoder inputs: 75-token chunks, and textual-inversion vectors put in place.

As in the WebUIs, a long prompt is split into chunks of 75 tokens, each encoded as BOS + 75 + EOS
(padded) and the encoder outputs are concatenated along the sequence. A chunk that fills up breaks
after its last comma when that is near the end, so phrases stay together; an embedding is never
split across chunks. The rules (`_split_chunks`) are the WebUIs' to the token, quirks included:
an embedding must be conditioned in training as it will be at generation.

An embedding is named in a prompt by its name (the file name), which is tokenized and searched for
in the prompt's tokens; where it occurs, its n vectors take the place of those tokens. The vectors
stay differentiable, which is how textual inversion trains them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from lib_training.model.diffusion import EmbeddingVectors, TextEncoder, TextEncoderOutput, Tokenizer

CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS
CONTEXT_TOKENS = CHUNK_TOKENS + 2


@dataclass(frozen=True)
class EmbeddingSlot:
    """Where an embedding's vectors go: prompt `row`, chunk, first position inside the 77."""

    row: int
    chunk: int
    position: int
    name: str


@dataclass
class TokenizedPrompts:
    ids: Tensor  # [B, chunks, 77] int64
    slots: list[EmbeddingSlot]

    @property
    def chunks(self) -> int:
        return self.ids.shape[1]


@dataclass
class _Piece:
    """One token, or one embedding occupying `length` positions."""

    token: int
    length: int = 1
    embedding: str | None = None


def _find_embeddings(tokens: list[int], patterns: Mapping[str, list[int]], lengths: Mapping[str, int]) -> list[_Piece]:
    """Split a token list into plain tokens and embedding occurrences (longest name first)."""
    by_first: dict[int, list[tuple[str, list[int]]]] = {}
    for name, pattern in patterns.items():
        if pattern:
            by_first.setdefault(pattern[0], []).append((name, pattern))
    for candidates in by_first.values():
        candidates.sort(key=lambda item: len(item[1]), reverse=True)

    pieces: list[_Piece] = []
    i = 0
    while i < len(tokens):
        match = next(
            (name for name, pattern in by_first.get(tokens[i], []) if tokens[i : i + len(pattern)] == pattern),
            None,
        )
        if match is None:
            pieces.append(_Piece(tokens[i]))
            i += 1
        else:
            pieces.append(_Piece(-1, lengths[match], match))
            i += len(patterns[match])
    return pieces


@dataclass
class _Chunk:
    """Up to CHUNK_TOKENS token ids (0 where an embedding's vectors go) and the embeddings placed in it."""

    tokens: list[int] = field(default_factory=list)
    embeddings: list[tuple[int, str]] = field(default_factory=list)  # (index in `tokens`, name)


def _split_chunks(pieces: list[_Piece], comma_id: int | None, backtrack: int) -> list[_Chunk]:
    """Group pieces into chunks of CHUNK_TOKENS positions exactly as A1111 and Forge do:

    - a chunk is closed when it is full and another piece comes (or at the end);
    - if that piece is not a comma and at most `backtrack - 1` tokens follow the chunk's last comma,
      those tokens move on to the next chunk (none when `backtrack` is 0). Only the token ids move:
      an embedding among them stays recorded where it was placed (the WebUIs keep its vectors in the
      closed chunk and leave ids 0 in the next one), so that training conditions prompts as
      generation will;
    - a comma that arrives at a full chunk opens the next one and is no break point there;
    - an embedding that does not fit opens the next chunk, with no going back to a comma.
    """
    chunks: list[_Chunk] = []
    chunk = _Chunk()
    last_comma = -1  # index in chunk.tokens of its latest comma; -1 when it has none

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = _Chunk(), -1

    for piece in pieces:
        if piece.embedding is None and piece.token == comma_id:
            last_comma = len(chunk.tokens)
        elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= backtrack:
            moved = chunk.tokens[last_comma + 1 :]
            del chunk.tokens[last_comma + 1 :]
            close()
            chunk.tokens = moved
        if len(chunk.tokens) == CHUNK_TOKENS:
            close()
        if piece.embedding is None:
            chunk.tokens.append(piece.token)
            continue
        if piece.length > CHUNK_TOKENS:
            raise ValueError(f"embedding {piece.embedding!r} has {piece.length} vectors; at most {CHUNK_TOKENS} fit")
        if len(chunk.tokens) + piece.length > CHUNK_TOKENS:
            close()
        chunk.embeddings.append((len(chunk.tokens), piece.embedding))
        chunk.tokens.extend([0] * piece.length)
    if chunk.tokens or not chunks:
        chunks.append(chunk)
    return chunks


def tokenize(
    prompts: Sequence[str],
    tokenizer: Tokenizer,
    embedding_lengths: Mapping[str, int] | None = None,
    min_chunks: int = 1,
) -> TokenizedPrompts:
    """Tokenize prompts into [B, chunks, 77] ids; every prompt gets the same number of chunks.

    `embedding_lengths` maps embedding names to their vector counts; their positions are returned
    as slots and hold id 0 in `ids`, as in A1111 (the vectors replace them; a 0 there keeps the
    first EOS, where pooling reads, after the embedding).
    """
    embedding_lengths = embedding_lengths or {}
    patterns = {name: tokenizer.encode(name) for name in embedding_lengths}
    comma = tokenizer.encode(",")
    comma_id = comma[0] if len(comma) == 1 else None

    per_prompt = [
        _split_chunks(
            _find_embeddings(tokenizer.encode(p), patterns, embedding_lengths), comma_id, tokenizer.comma_backtrack
        )
        for p in prompts
    ]
    n_chunks = max([min_chunks, *(len(c) for c in per_prompt)])
    ids = torch.full((len(prompts), n_chunks, CONTEXT_TOKENS), tokenizer.pad_id, dtype=torch.long)
    slots: list[EmbeddingSlot] = []
    for row, chunks in enumerate(per_prompt):
        for c in range(n_chunks):
            chunk = chunks[c] if c < len(chunks) else _Chunk()
            tokens = [tokenizer.bos_id, *chunk.tokens, tokenizer.eos_id]
            ids[row, c, : len(tokens)] = torch.tensor(tokens)
            slots.extend(EmbeddingSlot(row, c, 1 + index, name) for index, name in chunk.embeddings)
    return TokenizedPrompts(ids, slots)


def embed_tokens(
    encoder: TextEncoder,
    tokens: TokenizedPrompts,
    embeddings: Mapping[str, EmbeddingVectors],
) -> Tensor:
    """Token embeddings [B * chunks, 77, width] with each embedding's vectors in its slots."""
    flat_ids = rearrange(tokens.ids, "b c t -> (b c) t").to(encoder.token_embedding.weight.device)
    embeds = encoder.token_embedding(flat_ids)
    if not tokens.slots:
        return embeds
    embeds = embeds.clone()  # out of place: the vectors must stay differentiable
    for slot in tokens.slots:
        vectors = embeddings[slot.name][encoder.key].to(embeds.dtype)  # [n, width]
        row = slot.row * tokens.chunks + slot.chunk
        embeds[row, slot.position : slot.position + vectors.shape[0]] = vectors
    return embeds


def encode_with_encoder(
    encoder: TextEncoder,
    prompts: Sequence[str],
    embeddings: Mapping[str, EmbeddingVectors],
    min_chunks: int = 1,
) -> TextEncoderOutput:
    """Encode prompts with one text encoder: hidden [B, 77 * chunks, C], pooled of the first chunk.

    One encoder call per chunk, as the WebUIs make them: the same batch shapes give the same
    rounding, so the conditioning equals the host's to the bit.
    """
    lengths = {name: _vector_count(vectors, encoder.key, name) for name, vectors in embeddings.items()}
    tokens = tokenize(prompts, encoder.tokenizer, lengths, min_chunks)
    embeds = rearrange(embed_tokens(encoder, tokens, embeddings), "(b c) t d -> b c t d", c=tokens.chunks)
    outputs = [
        encoder.encode_embeddings(embeds[:, c], tokens.ids[:, c].to(embeds.device)) for c in range(tokens.chunks)
    ]
    hidden = torch.cat([out.hidden for out in outputs], dim=1)  # [B, 77 * chunks, C]
    return TextEncoderOutput(hidden, outputs[0].pooled)


def count_chunks(prompts: Sequence[str], tokenizer: Tokenizer, embeddings: Mapping[str, EmbeddingVectors]) -> int:
    """How many chunks the longest of `prompts` needs (embedding lengths taken from any encoder)."""
    lengths = {name: next(iter(vectors.values())).shape[0] for name, vectors in embeddings.items()}
    return tokenize(prompts, tokenizer, lengths).chunks


def _vector_count(vectors: EmbeddingVectors, key: str, name: str) -> int:
    if key not in vectors:
        raise KeyError(f"embedding {name!r} has no vectors for text encoder {key!r} (it has {sorted(vectors)})")
    return int(vectors[key].shape[0])
