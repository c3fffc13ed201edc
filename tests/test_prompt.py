"""Prompts to token chunks, and textual-inversion vectors put in place."""

from __future__ import annotations

import torch

from lib_training.model.diffusion import TextEncoderOutput
from lib_training.model.networks.tokenizer import ClipTokenizer
from lib_training.model.prompt import CONTEXT_TOKENS, embed_tokens, encode_with_encoder, tokenize

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


CAT, COMMA = TOK.encode("cat")[0], TOK.encode(",")[0]


def _chunks(words: list[str], embeddings: dict[str, int] | None = None) -> list[list[int]]:
    """The 75 positions between BOS and EOS of each chunk of the prompt `words` (one token each)."""
    ids = tokenize([" ".join(words)], TOK, embeddings).ids[0]
    return [chunk[1:76].tolist() for chunk in ids]


def test_a_full_chunk_moves_at_most_19_tokens_after_its_comma_on() -> None:
    """A1111's and Forge's comma backtrack of 20 counts the comma: 19 tokens move, 20 do not."""
    moved = _chunks(["cat"] * 55 + [","] + ["cat"] * 25)  # 19 tokens after the comma when the chunk fills
    kept = _chunks(["cat"] * 54 + [","] + ["cat"] * 26)  # 20 tokens after it

    assert moved[0][55] == COMMA and moved[0][56] == TOK.eos_id
    assert moved[1][:26] == [CAT] * 25 + [TOK.eos_id]
    assert kept[0][54] == COMMA and kept[0][55:] == [CAT] * 20
    assert kept[1][:7] == [CAT] * 6 + [TOK.eos_id]


def test_a_comma_that_arrives_at_a_full_chunk_opens_the_next_one() -> None:
    chunks = _chunks(["cat"] * 70 + [","] + ["cat"] * 4 + [","] + ["cat"] * 3)

    assert chunks[0] == [CAT] * 70 + [COMMA] + [CAT] * 4  # no going back to the earlier comma
    assert chunks[1][:5] == [COMMA, CAT, CAT, CAT, TOK.eos_id]


def test_an_embedding_after_a_full_chunk_moves_the_tokens_after_the_comma_on() -> None:
    tokens = tokenize([" ".join(["cat"] * 69 + [","] + ["cat"] * 5 + ["thing"])], TOK, {"thing": 2})

    assert tokens.ids[0, 0, 70:72].tolist() == [COMMA, TOK.eos_id]
    assert tokens.ids[0, 1, 1:9].tolist() == [CAT] * 5 + [0, 0, TOK.eos_id]
    assert [(slot.chunk, slot.position) for slot in tokens.slots] == [(1, 6)]


def test_an_embedding_moved_on_by_a_comma_keeps_its_vectors_where_the_webuis_put_them() -> None:
    """The WebUIs move only the token ids of the phrase after the comma; an embedding in it keeps
    its vectors in the chunk it was placed in (over the padding), and its ids 0 move on."""
    tokens = tokenize(
        [" ".join(["cat"] * 60 + [","] + ["cat"] * 10 + ["thing"] + ["cat"] * 2 + ["dog"])], TOK, {"thing": 2}
    )

    (slot,) = tokens.slots
    assert (slot.chunk, slot.position) == (0, 72)
    assert tokens.ids[0, 0, 61:63].tolist() == [COMMA, TOK.eos_id]
    assert tokens.ids[0, 1, 1:17].tolist() == [CAT] * 10 + [0, 0] + [CAT] * 2 + [TOK.encode("dog")[0], TOK.eos_id]


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
    """Hidden states are the token embeddings; pooled is the first position's; calls are recorded."""

    key = "clip_l"
    tokenizer = TOK

    def __init__(self) -> None:
        self.token_embedding = torch.nn.Embedding(49408, 8)
        self.calls: list[tuple[int, ...]] = []

    def encode_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor) -> TextEncoderOutput:
        self.calls.append(tuple(embeds.shape))
        return TextEncoderOutput(embeds, embeds[:, 0])


def test_embedding_vectors_replace_token_embeddings_and_stay_differentiable() -> None:
    encoder = _FakeEncoder()
    vectors = torch.randn(2, 8, requires_grad=True)
    tokens = tokenize(["x thing"], TOK, {"thing": 2})
    embeds = embed_tokens(encoder, tokens, {"thing": {"clip_l": vectors}})
    slot = tokens.slots[0]
    assert torch.equal(embeds[0, slot.position : slot.position + 2], vectors)
    embeds.sum().backward()
    assert vectors.grad is not None and torch.equal(vectors.grad, torch.ones(2, 8))


def test_each_chunk_is_encoded_in_a_call_of_its_own_as_the_webuis_do() -> None:
    """Same batch shapes as the hosts' encoder calls, hence the same rounding in their matmuls."""
    encoder = _FakeEncoder()
    prompts = ["a cat", " ".join(["dog"] * 100)]

    out = encode_with_encoder(encoder, prompts, {})

    assert encoder.calls == [(2, CONTEXT_TOKENS, 8), (2, CONTEXT_TOKENS, 8)]
    embeds = encoder.token_embedding(tokenize(prompts, TOK).ids)  # [B, chunks, 77, 8]
    assert torch.equal(out.hidden, torch.cat([embeds[:, 0], embeds[:, 1]], dim=1))
    assert torch.equal(out.pooled, embeds[:, 0, 0])
