"""The host's text towers as our `TextEncoder`, differentiable with respect to the token embeddings.

Textual inversion needs the tower to run on given token embeddings (our vectors placed among the
prompt's tokens). The hosts' towers only take token ids, so for one call the tower's token
embedding module is swapped for one that returns the given embeddings (`given_token_embeddings`),
and the host's own code computes everything else: positions, causal mask, layers, the layer it
conditions on, pooling. The host's textual-inversion wrapper around the embedding is bypassed, so
its prompt state (`fixes`) and any hooks on it are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lib_training.model.diffusion import TextEncoderOutput
from lib_training.model.diffusion import Tokenizer as TokenizerProtocol
from lib_training.model.networks.text_encoder import TextEncoderConfig, TowerWeights, heads_for_width, hf_to_open_clip


def unwrap_embedding(module: nn.Module) -> nn.Embedding:
    """The `nn.Embedding` inside the hosts' textual-inversion wrappers (each keeps it at `.wrapped`)."""
    seen = 0
    while not isinstance(module, nn.Embedding):
        module = getattr(module, "wrapped", None)
        seen += 1
        if module is None or seen > 8:
            raise TypeError("cannot find the token embedding (nn.Embedding) of the host's text encoder")
    return module


class _GivenEmbeddings(nn.Module):
    """Stands in for a token embedding: returns `embeds` [B, L, W] for ids [B, L]."""

    def __init__(self, embeds: Tensor) -> None:
        super().__init__()
        self.embeds = embeds

    def forward(self, ids: Tensor) -> Tensor:
        if tuple(ids.shape) != tuple(self.embeds.shape[:2]):
            raise ValueError(f"token ids {tuple(ids.shape)} do not match embeddings {tuple(self.embeds.shape)}")
        return self.embeds


@contextlib.contextmanager
def given_token_embeddings(parent: nn.Module, name: str, embeds: Tensor) -> Iterator[None]:
    """While inside, `parent.<name>` (a token embedding) returns `embeds`; the original comes back after."""
    original = parent._modules[name]
    parent._modules[name] = _GivenEmbeddings(embeds)
    try:
        yield
    finally:
        parent._modules[name] = original


class _EmbeddingOnDevice(nn.Module):
    """A token embedding kept on another device (Forge's text encoder on the CPU), answering on `device`."""

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.inner = embedding
        self.device = device

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.inner(ids.to(self.inner.weight.device)).to(self.device)


def _on_device(embedding: nn.Embedding, device: torch.device) -> nn.Module:
    return embedding if embedding.weight.device == device else _EmbeddingOnDevice(embedding, device)


def unwrapped_state(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` without the textual-inversion wrappers' `.wrapped` level (the tensors
    themselves, not copies; a name the wrapper registers twice is kept once)."""
    state: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        state.setdefault(key.replace(".wrapped.", "."), value)
    return state


def weights_version(module: nn.Module) -> int:
    """Changes when a parameter of `module` is modified in place or replaced (for caches of results
    computed from the weights). Inference tensors (Forge) have no version counter: their storage counts."""
    parts = []
    for param in module.parameters():
        try:
            parts.append((param.data_ptr(), param._version))
        except RuntimeError:  # "Inference tensors do not track version counter"
            parts.append((param.data_ptr(), 0))
    return hash(tuple(parts))


def _clip_skip(layer: int, layers: int) -> int:
    """Our `clip_skip` for a host's `hidden_states[layer]` (0 = embeddings, -1 or `layers` = last layer)."""
    index = layers + 1 + layer if layer < 0 else layer  # blocks run before the hidden state
    return layers - index + 1


_OPEN_CLIP_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_OPEN_CLIP_TEXT += ("logit_scale",)


class _HostTextEncoder:
    """What both kinds of tower share: key, tokenizer, token embedding, width."""

    def __init__(
        self,
        key: str,
        tokenizer: TokenizerProtocol,
        embedding: nn.Embedding,
        device: torch.device,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self.key = key
        self.tokenizer = tokenizer
        self.device = device
        self._embedding = embedding
        self.token_embedding: Any = _on_device(embedding, device)
        self._prepare = prepare

    @property
    def width(self) -> int:
        return int(self._embedding.weight.shape[1])

    def _inputs(self, embeds: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Embeddings and ids on the tower's device, embeddings in its embedding's dtype."""
        if self._prepare is not None:
            self._prepare()
        weight = self._embedding.weight
        return embeds.to(weight.device, weight.dtype), ids.to(weight.device)


class HFTextEncoder(_HostTextEncoder):
    """A Hugging Face `CLIPTextTransformer` (`text_model`): A1111's CLIP-L, Forge's every tower.

    `layer` indexes `hidden_states` (0 = embeddings, -1 = last layer); `final_norm` applies the
    tower's final LayerNorm to it; `projection` (Forge's clip_g) projects the pooled output;
    `feature_projection` is a projection the tower has without pooling through it (Forge's SD2), for
    the text features of a private copy (`tower_weights`).
    """

    def __init__(
        self,
        key: str,
        tokenizer: TokenizerProtocol,
        text_model: nn.Module,
        *,
        layer: int,
        final_norm: bool,
        device: torch.device,
        projection: nn.Module | None = None,
        prepare: Callable[[], None] | None = None,
        feature_projection: nn.Module | None = None,
    ) -> None:
        super().__init__(key, tokenizer, unwrap_embedding(text_model.embeddings.token_embedding), device, prepare)
        self.text_model = text_model
        self.layer = layer
        self.final_norm = final_norm
        self.projection = projection
        self.feature_projection = feature_projection

    def encode_embeddings(self, embeds: Tensor, ids: Tensor) -> TextEncoderOutput:
        embeds, ids = self._inputs(embeds, ids)
        with given_token_embeddings(self.text_model.embeddings, "token_embedding", embeds):
            out = self.text_model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[self.layer]  # [B, 77, W]
        if self.final_norm:
            hidden = self.text_model.final_layer_norm(hidden)
        pooled = None if self.projection is None else self.projection(out.pooler_output)  # [B, P]
        return TextEncoderOutput(hidden.to(self.device), None if pooled is None else pooled.to(self.device))

    def tower_weights(self) -> TowerWeights:
        """The tower in our open_clip layout and role (for a private copy: aesthetic gradients)."""
        c = self.text_model.config
        vocab, width = self._embedding.weight.shape
        projection = self.projection if self.projection is not None else self.feature_projection

        def read_state() -> dict[str, Tensor]:
            state = hf_to_open_clip({f"text_model.{k}": v for k, v in unwrapped_state(self.text_model).items()})
            if projection is not None:
                state["text_projection"] = projection.weight.T  # Linear [P, W] -> ours [W, P]
            return state

        config = TextEncoderConfig(
            key=self.key,  # type: ignore[arg-type]
            width=int(width),
            layers=int(c.num_hidden_layers),
            heads=int(c.num_attention_heads),
            activation="quick_gelu" if c.hidden_act == "quick_gelu" else "gelu",
            checkpoint_layout="hf",
            output_layer="last",
            final_norm=self.final_norm,
            projection_dim=None if projection is None else int(projection.weight.shape[0]),
            pooled_output=self.projection is not None,
            vocab_size=int(vocab),
            context_length=int(c.max_position_embeddings),
        )
        version = weights_version(self.text_model)
        if projection is not None:
            version ^= weights_version(projection)
        return TowerWeights(config, read_state, _clip_skip(self.layer, config.layers), version)


class OpenClipTextEncoder(_HostTextEncoder):
    """ldm's `FrozenOpenCLIPEmbedder` (A1111 SD2) or sgm's `FrozenOpenCLIPEmbedder2` (A1111 SDXL bigG).

    Runs the embedder's own `encode_with_transformer`: ldm returns the conditioning tensor (its
    layer, then ln_final); sgm returns a dict with its `layer` ("penultimate") and "pooled".
    """

    def __init__(
        self,
        key: str,
        tokenizer: TokenizerProtocol,
        embedder: nn.Module,
        *,
        device: torch.device,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(key, tokenizer, unwrap_embedding(embedder.model.token_embedding), device, prepare)
        self.embedder = embedder

    def encode_embeddings(self, embeds: Tensor, ids: Tensor) -> TextEncoderOutput:
        embeds, ids = self._inputs(embeds, ids)
        with given_token_embeddings(self.embedder.model, "token_embedding", embeds):
            out = self.embedder.encode_with_transformer(ids)
        pooled = None
        if isinstance(out, dict):
            hidden, pooled = out[self.embedder.layer], out.get("pooled")
        else:
            hidden = out
        return TextEncoderOutput(hidden.to(self.device), None if pooled is None else pooled.to(self.device))

    def tower_weights(self) -> TowerWeights:
        """The tower in our open_clip layout and role (for a private copy: aesthetic gradients). ldm's
        embedder applies ln_final to its layer; sgm's (SDXL bigG) does not and pools."""
        model = self.embedder.model

        def read_state() -> dict[str, Tensor]:
            return {k: v for k, v in unwrapped_state(model).items() if k.startswith(_OPEN_CLIP_TEXT)}

        projection = getattr(model, "text_projection", None)
        vocab, width = self._embedding.weight.shape
        blocks = model.transformer.resblocks
        sgm = hasattr(self.embedder, "legacy") or hasattr(self.embedder, "return_pooled")
        config = TextEncoderConfig(
            key=self.key,  # type: ignore[arg-type]
            width=int(width),
            layers=len(blocks),
            heads=int(getattr(blocks[0].attn, "num_heads", heads_for_width(int(width)))),
            activation="gelu",
            checkpoint_layout="open_clip",
            output_layer="last",
            final_norm=not sgm,
            projection_dim=None if projection is None else int(projection.shape[1]),
            has_logit_scale=getattr(model, "logit_scale", None) is not None,
            pooled_output=sgm and bool(getattr(self.embedder, "return_pooled", True)) and projection is not None,
            vocab_size=int(vocab),
            context_length=int(model.positional_embedding.shape[0]),
        )
        skip = int(getattr(self.embedder, "layer_idx", 0) or 0) + 1
        return TowerWeights(config, read_state, skip, weights_version(model))
