"""Prompts to token chunks, and textual-inversion vectors put in place."""

from __future__ import annotations

import torch

from lib_training.models.tokenizer import ClipTokenizer
from lib_training.prompt import CONTEXT_TOKENS, embed_tokens, tokenize

TOK = ClipTokenizer(pad_id=49407)
OPEN_CLIP_TOK = ClipTokenizer(pad_id=0)


def test_short_prompt_is_one_chunk_of_bos_tokens_eos_padding() -> None:
    tokens = tokenize(["a photo of a cat"], TOK)
    ids = tokens.ids[0, 0].tolist()
    body = TOK.encode("a photo of a cat")
    assert tokens.ids.shape == (1, 1, CONTEXT_TOKENS)
    assert ids[: len(body) + 2] == [TOK.bos_id, *body, TOK.eos_id]
    assert set(ids[len(body) + 2 :]) == {TOK.pad_id}


def test_open_clip_towers_pad_with_zero_after_the_eos() -> None:
    ids = tokenize(["a cat"], OPEN_CLIP_TOK).ids[0, 0].tolist()
    assert ids[:4] == [OPEN_CLIP_TOK.bos_id, *OPEN_CLIP_TOK.encode("a cat"), OPEN_CLIP_TOK.eos_id]
    assert set(ids[4:]) == {0}


def test_empty_prompt_is_one_chunk() -> None:
    tokens = tokenize([""], TOK)
    assert tokens.chunks == 1
    assert tokens.ids[0, 0, :2].tolist() == [TOK.bos_id, TOK.eos_id]


def test_long_prompt_is_split_into_75_token_chunks() -> None:
    prompt = " ".join(["cat"] * 160)  # "cat" is one token
    tokens = tokenize([prompt], TOK)
    assert tokens.chunks == 3
    assert (tokens.ids[0, :2, 1:76] == TOK.encode("cat")[0]).all()
    assert (tokens.ids[0, :, 0] == TOK.bos_id).all()


def test_batch_prompts_share_the_chunk_count() -> None:
    tokens = tokenize(["cat", " ".join(["dog"] * 100)], TOK)
    assert tokens.ids.shape == (2, 2, CONTEXT_TOKENS)
    assert tokens.ids[0, 1, :2].tolist() == [TOK.bos_id, TOK.eos_id]


def test_full_chunk_breaks_after_a_nearby_comma() -> None:
    words = ["cat"] * 70 + [","] + ["dog"] * 10
    tokens = tokenize([" ".join(words)], TOK)
    first, second = tokens.ids[0, 0].tolist(), tokens.ids[0, 1].tolist()
    comma = TOK.encode(",")[0]
    assert first[71] == comma and first[72] == TOK.eos_id  # chunk ends right after the comma
    assert second[1:11] == TOK.encode("dog")[0:1] * 10


def test_embedding_name_becomes_its_vector_slots() -> None:
    tokens = tokenize(["a photo of my-thing, outdoors"], TOK, {"my-thing": 3})
    (slot,) = tokens.slots
    prefix = TOK.encode("a photo of")
    assert slot.name == "my-thing" and slot.position == 1 + len(prefix)
    ids = tokens.ids[0, 0].tolist()
    assert ids[slot.position : slot.position + 3] == [0, 0, 0]
    assert ids[slot.position + 3] == TOK.encode(",")[0]


def test_embedding_is_never_split_across_chunks() -> None:
    prompt = " ".join(["cat"] * 73) + " thing"
    tokens = tokenize([prompt], TOK, {"thing": 5})
    (slot,) = tokens.slots
    assert slot.chunk == 1 and slot.position == 1


class _FakeEncoder:
    key = "clip_l"
    tokenizer = TOK

    def __init__(self) -> None:
        self.token_embedding = torch.nn.Embedding(49408, 8)


def test_embedding_vectors_replace_token_embeddings_and_stay_differentiable() -> None:
    encoder = _FakeEncoder()
    vectors = torch.randn(2, 8, requires_grad=True)
    tokens = tokenize(["x thing"], TOK, {"thing": 2})
    embeds = embed_tokens(encoder, tokens, {"thing": {"clip_l": vectors}})
    slot = tokens.slots[0]
    assert torch.equal(embeds[0, slot.position : slot.position + 2], vectors)
    embeds.sum().backward()
    assert vectors.grad is not None and torch.equal(vectors.grad, torch.ones(2, 8))
