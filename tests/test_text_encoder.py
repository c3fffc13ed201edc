"""Our CLIP text towers against transformers' CLIPTextModel, diffusers' OpenCLIP conversion and open_clip."""

from __future__ import annotations

from collections.abc import Mapping

import open_clip
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from open_clip.transformer import LayerNorm, TextTransformer
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.family import Arch
from lib_training.model.diffusion import TextEncoder
from lib_training.model.networks.text_encoder import (
    ClipTextEncoder,
    TextEncoderConfig,
    hf_to_open_clip,
    open_clip_to_hf,
    text_encoder_config_from_shapes,
)
from lib_training.model.networks.tokenizer import ClipTokenizer
from lib_training.model.tiny import randomize_weights

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on the Moon, highly detailed, 4k, trending on artstation",
    "",
]
SD2_PREFIX = "cond_stage_model.model."
SDXL_G_PREFIX = "conditioner.embedders.1.model."
TOLERANCE = 1e-4


# --- helpers -------------------------------------------------------------------------------------
def tiny_encoder(config: TextEncoderConfig, seed: int = 0) -> ClipTextEncoder:
    encoder = ClipTextEncoder(config).eval()
    randomize_weights(encoder, torch.Generator().manual_seed(seed))
    return encoder


def token_ids(tokenizer: ClipTokenizer, prompts: list[str], length: int = 77) -> Tensor:
    """[B, 77] chunks as the WebUIs build them: BOS, up to 75 tokens, EOS, then padding."""
    rows = []
    for prompt in prompts:
        tokens = [tokenizer.bos_id, *tokenizer.encode(prompt)[: length - 2], tokenizer.eos_id]
        rows.append(tokens + [tokenizer.pad_id] * (length - len(tokens)))
    return torch.tensor(rows)


def encode(encoder: ClipTextEncoder, ids: Tensor):
    return encoder.encode_embeddings(encoder.token_embedding(ids), ids)


def hf_config(config: TextEncoderConfig, layers: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=4 * config.width,
        num_hidden_layers=config.layers if layers is None else layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.context_length,
        hidden_act=config.activation,
        layer_norm_eps=1e-5,
        projection_dim=config.projection_dim or config.width,
        attn_implementation="eager",
    )


def diffusers_conversion(encoder: ClipTextEncoder, prefix: str, reference: nn.Module) -> dict[str, Tensor]:
    checkpoint = {prefix + key: value for key, value in encoder.checkpoint_state_dict().items()}
    return convert_open_clip_checkpoint(reference, checkpoint, prefix=prefix)


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def meta_encoder(config: TextEncoderConfig) -> ClipTextEncoder:
    with torch.device("meta"):
        return ClipTextEncoder(config)


def meta_reference(cls: type[CLIPTextModel | CLIPTextModelWithProjection], config: CLIPTextConfig) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def clip_text_parameters(config: TextEncoderConfig) -> int:
    """Parameters of a CLIP text tower, counted from its structure."""
    W = config.width
    per_layer = (
        (3 * W * W + 3 * W)  # fused q/k/v projection
        + (W * W + W)  # attention output projection
        + (W * 4 * W + 4 * W)  # MLP up
        + (4 * W * W + W)  # MLP down
        + 2 * 2 * W  # two LayerNorms
    )
    embeddings = config.vocab_size * W + config.context_length * W
    projection = W * config.projection_dim if config.projection_dim else 0
    return embeddings + config.layers * per_layer + 2 * W + projection + int(config.has_logit_scale)


ALL_PRESETS = {
    f"{name}{'_tiny' if tiny else ''}": getattr(TextEncoderConfig, name)(tiny=tiny)
    for name in ("clip_l_sd1", "clip_h_sd2", "clip_l_sdxl", "clip_g_sdxl")
    for tiny in (False, True)
}


# --- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_encode_matches_open_clip_tokenize() -> None:
    reference = open_clip.tokenize(["a photo of a cat"])[0].tolist()  # BOS, tokens, EOS, zeros
    tokenizer = ClipTokenizer(pad_id=0)
    eos_at = reference.index(tokenizer.eos_id)
    assert reference[0] == tokenizer.bos_id
    assert tokenizer.encode("a photo of a cat") == reference[1:eos_at]


def test_tokenizer_lowercases_and_collapses_whitespace() -> None:
    tokenizer = ClipTokenizer(pad_id=0)
    assert tokenizer.encode("  A   Photo\n of a CAT ") == tokenizer.encode("a photo of a cat")


@pytest.mark.parametrize(
    ("config", "pad_id"),
    [
        (TextEncoderConfig.clip_l_sd1(), 49407),
        (TextEncoderConfig.clip_h_sd2(), 0),
        (TextEncoderConfig.clip_l_sdxl(), 49407),
        (TextEncoderConfig.clip_g_sdxl(), 0),
    ],
    ids=["sd1_clip_l", "sd2_clip_h", "sdxl_clip_l", "sdxl_clip_g"],
)
def test_encoder_tokenizer_pads_as_a1111(config: TextEncoderConfig, pad_id: int) -> None:
    tokenizer = meta_encoder(config).tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (49406, 49407, pad_id)


# --- parity: CLIP-L against transformers ---------------------------------------------------------
def hf_twin(encoder: ClipTextEncoder) -> CLIPTextModel:
    reference = CLIPTextModel(hf_config(encoder.config)).eval()
    reference.load_state_dict(open_clip_to_hf(encoder.state_dict()), strict=True)
    return reference


@torch.no_grad()
def test_sd1_clip_l_matches_transformers_last_hidden_state() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_l_sd1(tiny=True))
    ids = token_ids(encoder.tokenizer, PROMPTS)
    expected = hf_twin(encoder)(input_ids=ids).last_hidden_state
    assert max_diff(encode(encoder, ids).hidden, expected) < TOLERANCE


@torch.no_grad()
def test_sdxl_clip_l_matches_transformers_penultimate_hidden_state() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_l_sdxl(tiny=True))
    ids = token_ids(encoder.tokenizer, PROMPTS)
    expected = hf_twin(encoder)(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    output = encode(encoder, ids)
    assert output.pooled is None
    assert max_diff(output.hidden, expected) < TOLERANCE


@torch.no_grad()
def test_clip_skip_takes_an_earlier_layer_then_final_norm() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_l_sd1(tiny=True))
    reference = hf_twin(encoder)
    ids = token_ids(encoder.tokenizer, PROMPTS)
    hidden_states = reference(input_ids=ids, output_hidden_states=True).hidden_states
    encoder.clip_skip = 2
    expected = reference.text_model.final_layer_norm(hidden_states[-2])
    assert max_diff(encode(encoder, ids).hidden, expected) < TOLERANCE


def test_clip_skip_beyond_the_layer_count_is_a_config_error() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_l_sd1(tiny=True))
    encoder.clip_skip = encoder.config.layers + 1
    with pytest.raises(ConfigError, match="CLIP skip"):
        encode(encoder, token_ids(encoder.tokenizer, PROMPTS[:1]))


# --- parity: OpenCLIP towers against diffusers' conversion and open_clip --------------------------
@torch.no_grad()
def test_sd2_clip_h_matches_diffusers_conversion() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_h_sd2(tiny=True))
    reference = CLIPTextModel(hf_config(encoder.config)).eval()
    reference.load_state_dict(diffusers_conversion(encoder, SD2_PREFIX, reference), strict=True)
    ids = token_ids(encoder.tokenizer, PROMPTS)
    hidden_states = reference(input_ids=ids, output_hidden_states=True).hidden_states
    expected = reference.text_model.final_layer_norm(hidden_states[-2])
    assert max_diff(encode(encoder, ids).hidden, expected) < TOLERANCE


@torch.no_grad()
def test_sdxl_clip_g_matches_diffusers_conversion() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_g_sdxl(tiny=True))
    reference = CLIPTextModelWithProjection(hf_config(encoder.config)).eval()
    reference.load_state_dict(diffusers_conversion(encoder, SDXL_G_PREFIX, reference), strict=True)
    ids = token_ids(encoder.tokenizer, PROMPTS)
    expected = reference(input_ids=ids, output_hidden_states=True)
    output = encode(encoder, ids)
    assert max_diff(output.hidden, expected.hidden_states[-2]) < TOLERANCE
    assert output.pooled is not None
    assert max_diff(output.pooled, expected.text_embeds) < TOLERANCE


@torch.no_grad()
def test_sdxl_clip_g_pooled_matches_open_clip_text_transformer() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_g_sdxl(tiny=True))
    config = encoder.config
    reference = TextTransformer(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.width,
        heads=config.heads,
        layers=config.layers,
        output_dim=config.projection_dim,
        act_layer=nn.GELU,
        norm_layer=LayerNorm,
    ).eval()
    weights = {k: v for k, v in encoder.state_dict().items() if k != "logit_scale"}
    reference.load_state_dict(weights, strict=True)
    ids = token_ids(encoder.tokenizer, PROMPTS)
    assert max_diff(encode(encoder, ids).pooled, reference(ids)) < TOLERANCE


@torch.no_grad()
def test_blocks_of_either_open_clip_layout_give_the_same_output() -> None:
    """open_clip < 2.24 (A1111 ships 2.20) runs its blocks sequence-first [L, B, D], newer batch-first."""
    encoder = tiny_encoder(TextEncoderConfig.clip_g_sdxl(tiny=True))
    ids = token_ids(encoder.tokenizer, PROMPTS)
    expected = encode(encoder, ids)
    for block in encoder.transformer.resblocks:
        block.attn.batch_first = not block.attn.batch_first  # nn.MultiheadAttention reads it per call
    output = encode(encoder, ids)
    assert max_diff(output.hidden, expected.hidden) < 1e-5
    assert max_diff(output.pooled, expected.pooled) < 1e-5


# --- embeddings in, gradients out ---------------------------------------------------------------
@torch.no_grad()
def test_encode_embeddings_uses_the_given_vectors_not_the_ids() -> None:
    """A vector placed into `embeds` acts exactly like a token whose table row is that vector."""
    encoder = tiny_encoder(TextEncoderConfig.clip_l_sd1(tiny=True))
    ids = token_ids(encoder.tokenizer, PROMPTS[:2])
    vector = torch.randn(encoder.width, generator=torch.Generator().manual_seed(3)) * 0.02
    embeds = encoder.token_embedding(ids)
    embeds[:, 2] = vector
    placed = encoder.encode_embeddings(embeds, ids).hidden

    placeholder = 265  # any token id the prompts do not use
    assert not (ids == placeholder).any()
    ids[:, 2] = placeholder
    encoder.token_embedding.weight[placeholder] = vector
    assert max_diff(placed, encoder(ids).hidden) < 1e-6


@pytest.mark.parametrize("config", [TextEncoderConfig.clip_l_sd1(tiny=True), TextEncoderConfig.clip_g_sdxl(tiny=True)])
def test_gradients_flow_to_embeds(config: TextEncoderConfig) -> None:
    encoder = tiny_encoder(config).requires_grad_(False)
    ids = token_ids(encoder.tokenizer, PROMPTS[:2])
    embeds = encoder.token_embedding(ids).clone().requires_grad_(True)
    output = encoder.encode_embeddings(embeds, ids)
    loss = output.hidden.square().mean() + (0 if output.pooled is None else output.pooled.square().mean())
    loss.backward()
    assert embeds.grad is not None
    assert embeds.grad.abs().amax(dim=(0, 2)).gt(0).all()  # every position matters


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_g_sdxl(tiny=True)).requires_grad_(False)
    ids = token_ids(encoder.tokenizer, PROMPTS[:2])
    grads = []
    for enabled in (False, True):
        encoder.set_gradient_checkpointing(enabled)
        embeds = encoder.token_embedding(ids).clone().requires_grad_(True)
        output = encoder.encode_embeddings(embeds, ids)
        (output.hidden.square().mean() + output.pooled.square().mean()).backward()
        grads.append(embeds.grad)
    assert max_diff(grads[0], grads[1]) < 1e-6


def test_encoder_implements_the_text_encoder_protocol() -> None:
    encoder = meta_encoder(TextEncoderConfig.clip_g_sdxl())
    assert isinstance(encoder, TextEncoder)
    assert (encoder.key, encoder.width) == ("clip_g", 1280)


# --- full size (meta device) ---------------------------------------------------------------------
def sd1_text_encoder_keys() -> set[str]:
    """The CLIP-L keys of a real SD1 checkpoint, after `cond_stage_model.transformer.`."""
    keys = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    }
    layer_parts = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    ]
    for index in range(12):
        for part in layer_parts:
            keys |= {f"text_model.encoder.layers.{index}.{part}.{kind}" for kind in ("weight", "bias")}
    return keys


def test_sd1_clip_l_has_exactly_the_parameters_of_the_real_model() -> None:
    encoder = meta_encoder(TextEncoderConfig.clip_l_sd1())
    assert not hasattr(encoder, "text_projection")
    assert parameter_count(encoder) == clip_text_parameters(encoder.config) == 123_060_480


def test_sd1_clip_l_checkpoint_keys_are_the_real_sd1_keys() -> None:
    encoder = meta_encoder(TextEncoderConfig.clip_l_sd1())
    hf = encoder.checkpoint_state_dict()
    assert set(hf) == sd1_text_encoder_keys()
    assert hf["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert hf["text_model.encoder.layers.0.self_attn.q_proj.weight"].shape == (768, 768)
    reference = meta_reference(CLIPTextModel, hf_config(encoder.config))
    assert {k: v.shape for k, v in hf.items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_hf_round_trip_is_the_identity() -> None:
    full = meta_encoder(TextEncoderConfig.clip_l_sd1()).state_dict()
    back = hf_to_open_clip(open_clip_to_hf(full))
    assert list(back) == list(full)
    assert all(back[k].shape == v.shape for k, v in full.items())
    tiny = tiny_encoder(TextEncoderConfig.clip_l_sd1(tiny=True)).state_dict()
    back = hf_to_open_clip(open_clip_to_hf(tiny))
    assert list(back) == list(tiny)
    assert all(torch.equal(back[k], v) for k, v in tiny.items())


@pytest.mark.parametrize(
    ("config", "parameters"),
    [
        # 49408·1024 + 77·1024 + 24·(12·1024² + 13·1024) + 2·1024 + 1024² + 1
        (TextEncoderConfig.clip_h_sd2(), 354_032_641),
        # 49408·1280 + 77·1280 + 32·(12·1280² + 13·1280) + 2·1280 + 1280² + 1
        (TextEncoderConfig.clip_g_sdxl(), 694_659_841),
    ],
    ids=["sd2_clip_h", "sdxl_clip_g"],
)
def test_open_clip_towers_have_the_parameters_of_their_structure(config: TextEncoderConfig, parameters: int) -> None:
    encoder = meta_encoder(config)
    assert parameter_count(encoder) == clip_text_parameters(config) == parameters


def numel(sd: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in sd.values())


def test_diffusers_consumes_every_used_key_of_full_size_sd2() -> None:
    """diffusers drops SD2's last block and text_projection (SD2 conditions on the penultimate layer)."""
    encoder = meta_encoder(TextEncoderConfig.clip_h_sd2())
    reference = meta_reference(CLIPTextModel, hf_config(encoder.config, layers=23))
    converted = diffusers_conversion(encoder, SD2_PREFIX, reference)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours = encoder.state_dict()
    unused = {k: v for k, v in ours.items() if k.startswith("transformer.resblocks.23.")}
    unused |= {"text_projection": ours["text_projection"], "logit_scale": ours["logit_scale"]}
    assert numel(converted) == numel(ours) - numel(unused)


def test_diffusers_consumes_every_key_of_full_size_sdxl_clip_g() -> None:
    encoder = meta_encoder(TextEncoderConfig.clip_g_sdxl())
    reference = meta_reference(CLIPTextModelWithProjection, hf_config(encoder.config))
    converted = diffusers_conversion(encoder, SDXL_G_PREFIX, reference)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours = encoder.state_dict()
    assert numel(converted) == numel(ours) - ours["logit_scale"].numel()  # the CLIP temperature


# --- configs from shapes, loading ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(ALL_PRESETS))
def test_config_from_shapes_recovers_each_preset(name: str) -> None:
    preset = ALL_PRESETS[name]
    shapes = {k: tuple(v.shape) for k, v in meta_encoder(preset).checkpoint_state_dict().items()}
    family_preset = getattr(TextEncoderConfig, name.removesuffix("_tiny"))()
    assert text_encoder_config_from_shapes(shapes, family_preset) == preset


def test_for_arch_lists_each_familys_encoders_in_checkpoint_order() -> None:
    assert [c.key for c in TextEncoderConfig.for_arch(Arch.SD1)] == ["clip_l"]
    assert [c.key for c in TextEncoderConfig.for_arch(Arch.SD2)] == ["clip_h"]
    assert TextEncoderConfig.for_arch(Arch.SDXL, tiny=True) == (
        TextEncoderConfig.clip_l_sdxl(tiny=True),
        TextEncoderConfig.clip_g_sdxl(tiny=True),
    )


def test_config_from_shapes_rejects_keys_of_another_layout() -> None:
    open_clip_shapes = {k: tuple(v.shape) for k, v in meta_encoder(TextEncoderConfig.clip_h_sd2()).state_dict().items()}
    with pytest.raises(CheckpointError, match="unexpected key"):
        text_encoder_config_from_shapes(open_clip_shapes, TextEncoderConfig.clip_l_sd1())


def test_config_from_shapes_requires_the_projection_of_a_pooled_encoder() -> None:
    shapes = {k: tuple(v.shape) for k, v in meta_encoder(TextEncoderConfig.clip_g_sdxl()).state_dict().items()}
    del shapes["text_projection"]
    with pytest.raises(CheckpointError, match="text_projection"):
        text_encoder_config_from_shapes(shapes, TextEncoderConfig.clip_g_sdxl())


@torch.no_grad()
def test_from_checkpoint_loads_sd1_weights_and_drops_position_ids() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_l_sd1(tiny=True))
    checkpoint = encoder.checkpoint_state_dict()
    checkpoint["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    loaded = ClipTextEncoder.from_checkpoint(checkpoint, TextEncoderConfig.clip_l_sd1()).eval()
    assert loaded.config == encoder.config
    ids = token_ids(encoder.tokenizer, PROMPTS)
    assert torch.equal(loaded(ids).hidden, encoder(ids).hidden)


def test_loading_an_incomplete_checkpoint_is_a_checkpoint_error() -> None:
    encoder = tiny_encoder(TextEncoderConfig.clip_h_sd2(tiny=True))
    checkpoint = encoder.checkpoint_state_dict()
    del checkpoint["ln_final.weight"]
    with pytest.raises(CheckpointError, match=r"ln_final\.weight"):
        ClipTextEncoder(encoder.config).load_state_dict_from_checkpoint(checkpoint)


def test_hf_checkpoint_missing_a_value_projection_is_a_checkpoint_error() -> None:
    checkpoint = tiny_encoder(TextEncoderConfig.clip_l_sd1(tiny=True)).checkpoint_state_dict()
    del checkpoint["text_model.encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointError, match=r"v_proj\.bias"):
        hf_to_open_clip(checkpoint)
