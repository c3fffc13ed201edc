"""CLIP text towers of SD1 (OpenAI CLIP-L), SD2 (OpenCLIP ViT-H) and SDXL (CLIP-L + OpenCLIP bigG).

Built from open_clip's transformer blocks, so our own state dict is in open_clip layout
(`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.…`, `ln_final.…`,
optional `text_projection`, `logit_scale`). Checkpoints store CLIP-L in the Hugging Face
`CLIPTextModel` layout (`text_model.…`) and the OpenCLIP towers in open_clip layout;
`load_state_dict_from_checkpoint` / `checkpoint_state_dict` speak the checkpoint's own layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import Tensor, nn

from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.family import Arch
from lib_training.model.checkpointing import checkpoint
from lib_training.model.diffusion import TextEncoderOutput
from lib_training.model.networks.tokenizer import EOS_ID, OPEN_CLIP_PAD_ID, ClipTokenizer

EncoderKey = Literal["clip_l", "clip_h", "clip_g"]
Activation = Literal["quick_gelu", "gelu"]
CheckpointLayout = Literal["hf", "open_clip"]
OutputLayer = Literal["last", "penultimate"]

HEAD_DIM = 64  # every CLIP text tower uses 64-wide attention heads


def heads_for_width(width: int) -> int:
    """Attention heads of a CLIP text tower of this width."""
    return max(1, width // HEAD_DIM)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape and role of one text tower.

    `output_layer` and `final_norm` say which hidden state conditions the UNet: SD1 uses the last
    layer after `ln_final`, SD2 the penultimate layer after `ln_final`, SDXL the penultimate layer
    as it is. `pooled_output` (SDXL's bigG) adds ln_final(last layer) at the EOS token, projected.
    """

    key: EncoderKey  # name of this part in textual-inversion files
    width: int
    layers: int
    heads: int
    activation: Activation
    checkpoint_layout: CheckpointLayout
    output_layer: OutputLayer
    final_norm: bool
    projection_dim: int | None = None  # text_projection [width, projection_dim] present
    has_logit_scale: bool = False
    pooled_output: bool = False
    vocab_size: int = 49408
    context_length: int = 77

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"text encoder width {self.width} is not divisible by {self.heads} heads")
        if self.output_layer == "penultimate" and self.layers < 2:
            raise ConfigError("a text encoder that outputs its penultimate layer needs at least 2 layers")
        if self.pooled_output and self.projection_dim is None:
            raise ConfigError(f"text encoder {self.key} has a pooled output but no text projection")

    @property
    def pad_id(self) -> int:
        """Token that fills a chunk after EOS: EOS for OpenAI's CLIP-L, 0 for the OpenCLIP towers."""
        return EOS_ID if self.key == "clip_l" else OPEN_CLIP_PAD_ID

    # --- presets ----------------------------------------------------------------------------
    @classmethod
    def clip_l_sd1(cls, *, tiny: bool = False) -> TextEncoderConfig:
        """SD1's OpenAI CLIP ViT-L/14 text tower: last layer, then ln_final."""
        width, layers = (128, 3) if tiny else (768, 12)
        return cls(
            key="clip_l",
            width=width,
            layers=layers,
            heads=heads_for_width(width),
            activation="quick_gelu",
            checkpoint_layout="hf",
            output_layer="last",
            final_norm=True,
        )

    @classmethod
    def clip_h_sd2(cls, *, tiny: bool = False) -> TextEncoderConfig:
        """SD2's OpenCLIP ViT-H/14 text tower: penultimate layer, then ln_final."""
        width, layers = (128, 3) if tiny else (1024, 24)
        return cls(
            key="clip_h",
            width=width,
            layers=layers,
            heads=heads_for_width(width),
            activation="gelu",
            checkpoint_layout="open_clip",
            output_layer="penultimate",
            final_norm=True,
            projection_dim=width,
            has_logit_scale=True,
        )

    @classmethod
    def clip_l_sdxl(cls, *, tiny: bool = False) -> TextEncoderConfig:
        """SDXL's first encoder, OpenAI CLIP-L: penultimate layer without ln_final."""
        width, layers = (64, 3) if tiny else (768, 12)
        return cls(
            key="clip_l",
            width=width,
            layers=layers,
            heads=heads_for_width(width),
            activation="quick_gelu",
            checkpoint_layout="hf",
            output_layer="penultimate",
            final_norm=False,
        )

    @classmethod
    def clip_g_sdxl(cls, *, tiny: bool = False) -> TextEncoderConfig:
        """SDXL's second encoder, OpenCLIP ViT-bigG/14: penultimate layer without ln_final, plus pooled."""
        width, layers = (128, 3) if tiny else (1280, 32)
        return cls(
            key="clip_g",
            width=width,
            layers=layers,
            heads=heads_for_width(width),
            activation="gelu",
            checkpoint_layout="open_clip",
            output_layer="penultimate",
            final_norm=False,
            projection_dim=width,
            has_logit_scale=True,
            pooled_output=True,
        )

    @classmethod
    def for_arch(cls, arch: Arch, *, tiny: bool = False) -> tuple[TextEncoderConfig, ...]:
        """The text encoders of a model family, in checkpoint order (SDXL: CLIP-L, then bigG)."""
        if arch is Arch.SD1:
            return (cls.clip_l_sd1(tiny=tiny),)
        if arch is Arch.SD2:
            return (cls.clip_h_sd2(tiny=tiny),)
        return (cls.clip_l_sdxl(tiny=tiny), cls.clip_g_sdxl(tiny=tiny))


# --- key layouts -----------------------------------------------------------------------------
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER_PARTS = re.compile(
    r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
)
_OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_OPEN_CLIP_LAYER_PARTS = re.compile(
    r"attn\.in_proj_(weight|bias)|(attn\.out_proj|ln_1|ln_2|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
)
# HF CLIPTextModel name -> open_clip name, within one layer
_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# HF CLIPTextModel name -> open_clip name, outside the layers (text_projection is transposed too)
_TOP_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_PROJECTION = "text_projection.weight"  # [P, W] (nn.Linear); open_clip stores [W, P]
_HF_DROPPED = {"text_model.embeddings.position_ids"}  # a buffer some SD1 checkpoints carry
_OPEN_CLIP_DROPPED = {"attn_mask"}  # a buffer some converted checkpoints carry
_QKV = ("q_proj", "k_proj", "v_proj")


def hf_to_open_clip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel layout (`text_model.…`) -> our open_clip layout; q/k/v are fused into in_proj."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}  # (layer, weight|bias) -> {q_proj: …}
    for key, value in sd.items():
        if key in _HF_DROPPED:
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        if key == _HF_PROJECTION:
            out["text_projection"] = value.T.contiguous()
            continue
        layer = _HF_LAYER.fullmatch(key)
        part = _HF_LAYER_PARTS.fullmatch(layer.group(2)) if layer else None
        if layer is None or part is None:
            raise CheckpointError(f"unexpected key {key!r} in a CLIP text encoder stored in HF layout")
        index, name, projection, kind = layer.group(1), part.group(1), part.group(2), part.group(3)
        if projection in _QKV:
            group = qkv.setdefault((index, kind), {})
            group[projection] = value
            if len(group) == len(_QKV):
                fused = torch.cat([group[p] for p in _QKV], dim=0)  # [3W, W] or [3W]
                out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = fused
        else:
            out[f"transformer.resblocks.{index}.{_LAYER_RENAMES[name]}.{kind}"] = value
    for (index, kind), group in qkv.items():
        if len(group) != len(_QKV):
            missing = [f"text_model.encoder.layers.{index}.self_attn.{p}.{kind}" for p in _QKV if p not in group]
            raise CheckpointError(f"CLIP text encoder is missing {', '.join(missing)}; the file is incomplete")
    return out


def open_clip_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our open_clip layout -> HF CLIPTextModel layout; the exact inverse of `hf_to_open_clip`."""
    top = {ours: theirs for theirs, ours in _TOP_RENAMES.items()}
    layer_renames = {ours: theirs for theirs, ours in _LAYER_RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _OPEN_CLIP_DROPPED:
            continue
        if key in top:
            out[top[key]] = value
            continue
        if key == "text_projection":
            out[_HF_PROJECTION] = value.T.contiguous()
            continue
        layer = _OPEN_CLIP_LAYER.fullmatch(key)
        part = _OPEN_CLIP_LAYER_PARTS.fullmatch(layer.group(2)) if layer else None
        if layer is None or part is None:
            raise CheckpointError(f"unexpected key {key!r} in a CLIP text encoder stored in open_clip layout")
        prefix = f"text_model.encoder.layers.{layer.group(1)}"
        if part.group(1) is not None:  # fused in_proj_weight / in_proj_bias
            for projection, chunk in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}.self_attn.{projection}.{part.group(1)}"] = chunk
        else:
            out[f"{prefix}.{layer_renames[part.group(2)]}.{part.group(3)}"] = value
    return out


def text_encoder_config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], preset: TextEncoderConfig
) -> TextEncoderConfig:
    """Size a text encoder from a checkpoint's tensor shapes (keys without the checkpoint prefix).

    The role (key, activation, layout, output layer, final norm, pooling) comes from `preset`, the
    family's preset; width, depth, vocabulary, context length, projection and logit scale come from
    the shapes, which must be in the preset's checkpoint layout.
    """
    hf = preset.checkpoint_layout == "hf"
    if hf:
        token_key, position_key = (
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
        )
        layer_re, part_re, dropped = _HF_LAYER, _HF_LAYER_PARTS, _HF_DROPPED
        top = {token_key, position_key, _HF_PROJECTION, "text_model.final_layer_norm.weight"}
        top |= {"text_model.final_layer_norm.bias"}
    else:
        token_key, position_key = "token_embedding.weight", "positional_embedding"
        layer_re, part_re, dropped = _OPEN_CLIP_LAYER, _OPEN_CLIP_LAYER_PARTS, _OPEN_CLIP_DROPPED
        top = {token_key, position_key, "text_projection", "logit_scale", "ln_final.weight", "ln_final.bias"}
    layout = "HF CLIPTextModel" if hf else "open_clip"
    where = f"the {preset.key} text encoder ({layout} layout)"

    indices: set[int] = set()
    for key in shapes:
        if key in top or key in dropped:
            continue
        layer = layer_re.fullmatch(key)
        if layer is None or part_re.fullmatch(layer.group(2)) is None:
            raise CheckpointError(
                f"unexpected key {key!r} in {where}; the checkpoint does not match the chosen model family"
            )
        indices.add(int(layer.group(1)))
    for required in (token_key, position_key):
        if required not in shapes:
            raise CheckpointError(f"{where} has no {required!r}; the checkpoint is incomplete or not this family")
    if not indices or indices != set(range(len(indices))):
        raise CheckpointError(f"{where} has layers {sorted(indices)}; expected 0..N-1 with N >= 1")

    vocab_size, width = shapes[token_key]
    context_length, position_width = shapes[position_key]
    if position_width != width:
        raise CheckpointError(f"{where}: position embedding width {position_width} != token width {width}")
    projection_dim = None
    if hf and _HF_PROJECTION in shapes:
        projection_dim = shapes[_HF_PROJECTION][0]  # [P, W]
    elif not hf and "text_projection" in shapes:
        projection_dim = shapes["text_projection"][1]  # [W, P]
    if preset.pooled_output and projection_dim is None:
        raise CheckpointError(f"{where} has no text_projection, which its pooled output needs")
    return replace(
        preset,
        width=width,
        layers=len(indices),
        heads=heads_for_width(width),
        vocab_size=vocab_size,
        context_length=context_length,
        projection_dim=projection_dim,
        has_logit_scale="logit_scale" in shapes,
    )


@dataclass(frozen=True)
class TowerWeights:
    """What a private copy of a text tower needs (aesthetic gradients personalise one per prompt).

    `state` gives the tower's current weights in our open_clip layout (converted from the host's
    layout when asked: only a copy needs them); `version` changes whenever one of them is modified
    in place or replaced (a LoRA merged by a host), so results computed from an older version are
    known to be stale.
    """

    config: TextEncoderConfig
    read_state: Callable[[], Mapping[str, Tensor]]
    clip_skip: int = 1
    version: int = 0

    @property
    def state(self) -> Mapping[str, Tensor]:
        return self.read_state()


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive mask [L, L]: -inf above the diagonal, so each token sees itself and earlier tokens."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


class ClipTextEncoder(nn.Module):
    """One CLIP text tower (implements `lib_training.model.diffusion.TextEncoder`).

    `clip_skip` (A1111's "CLIP skip") applies to encoders whose output layer is "last": the hidden
    state `clip_skip` layers from the end is used (1 = the last layer), then ln_final as configured.
    Encoders that output their penultimate layer ignore it.
    """

    def __init__(self, config: TextEncoderConfig, tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.key: str = config.key
        self.tokenizer = tokenizer or ClipTokenizer(pad_id=config.pad_id)
        self.clip_skip = 1
        self.gradient_checkpointing = False

        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(
            width=width,
            layers=config.layers,
            heads=config.heads,
            act_layer=QuickGELU if config.activation == "quick_gelu" else nn.GELU,
            norm_layer=LayerNorm,
        )
        self.ln_final = LayerNorm(width)
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(width, config.projection_dim))
        if config.has_logit_scale:
            self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP's initialisation of the embeddings, projection and temperature (blocks keep torch's)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.config.projection_dim is not None:
            nn.init.normal_(self.text_projection, std=self.width**-0.5)
        if self.config.has_logit_scale:
            self.logit_scale.fill_(math.log(1 / 0.07))

    @property
    def width(self) -> int:
        return self.config.width

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass (only while grad is enabled)."""
        self.gradient_checkpointing = enabled

    # --- forward ----------------------------------------------------------------------------
    def output_layer_index(self) -> int:
        """How many blocks run before the hidden state the UNet sees (clip_skip included)."""
        layers = self.config.layers
        if self.config.output_layer == "penultimate":
            return layers - 1
        if not 1 <= self.clip_skip <= layers:
            raise ConfigError(f"CLIP skip must be between 1 and {layers} for {self.key}, not {self.clip_skip}")
        return layers - (self.clip_skip - 1)

    def encode_embeddings(self, embeds: Tensor, ids: Tensor) -> TextEncoderOutput:
        """Token embeddings [B, L, width] (L <= 77) -> the configured hidden state [B, L, width].

        `ids` [B, L] are the token ids behind `embeds`; the EOS token (highest id) is pooled.
        Differentiable with respect to `embeds` (textual inversion trains vectors placed there).
        """
        batch, length, width = embeds.shape
        if width != self.width or length > self.config.context_length or ids.shape != (batch, length):
            raise ValueError(
                f"{self.key}: expected embeds [B, L <= {self.config.context_length}, {self.width}] and ids"
                f" [B, L], got {tuple(embeds.shape)} and {tuple(ids.shape)}"
            )
        dtype = self.positional_embedding.dtype
        x = embeds.to(dtype) + self.positional_embedding[:length]  # [B, L, W]
        mask = causal_mask(length, x.device, dtype)

        blocks = self.transformer.resblocks
        hidden_after = self.output_layer_index()
        run = len(blocks) if self.config.pooled_output else hidden_after
        batch_first = getattr(blocks[0].attn, "batch_first", False)  # open_clip < 2.24 is sequence-first
        if not batch_first:
            x = x.transpose(0, 1)  # [L, B, W]
        hidden = x
        for index, block in enumerate(blocks[:run]):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
            if index + 1 == hidden_after:
                hidden = x
        if not batch_first:
            x, hidden = x.transpose(0, 1), hidden.transpose(0, 1)

        if self.config.final_norm:
            hidden = self.ln_final(hidden)
        pooled = None
        if self.config.pooled_output:
            last = self.ln_final(x)  # [B, L, W]
            eos = last[torch.arange(batch, device=last.device), ids.argmax(dim=-1)]  # [B, W]
            pooled = eos @ self.text_projection  # [B, P]
        return TextEncoderOutput(hidden, pooled)

    def forward(self, ids: Tensor) -> TextEncoderOutput:
        """Token ids [B, L] -> output (see `encode_embeddings`)."""
        return self.encode_embeddings(self.token_embedding(ids), ids)

    def tower_weights(self) -> TowerWeights:
        """This tower's weights and role, for a private copy (`TowerWeights`)."""
        version = hash(tuple((p.data_ptr(), p._version) for p in self.parameters()))
        return TowerWeights(self.config, self.state_dict, self.clip_skip, version)

    # --- checkpoints ------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, sd: Mapping[str, Tensor], preset: TextEncoderConfig) -> ClipTextEncoder:
        """Build and load an encoder from its checkpoint part (prefix removed, checkpoint layout)."""
        config = text_encoder_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, preset)
        encoder = cls(config)
        encoder.load_state_dict_from_checkpoint(sd)
        return encoder

    def load_state_dict_from_checkpoint(self, sd: Mapping[str, Tensor], *, assign: bool = False) -> None:
        """Load weights given in the checkpoint's own layout (HF for CLIP-L, open_clip otherwise)."""
        if self.config.checkpoint_layout == "hf":
            ours = hf_to_open_clip(sd)
        else:
            ours = {k: v for k, v in sd.items() if k not in _OPEN_CLIP_DROPPED}
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        missing = sorted(set(expected) - set(ours))
        unexpected = sorted(set(ours) - set(expected))
        wrong = [
            f"{k} {tuple(v.shape)} (expected {expected[k]})"
            for k, v in ours.items()
            if k in expected and tuple(v.shape) != expected[k]
        ]
        if missing or unexpected or wrong:
            details = "; ".join(
                f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            )
            raise CheckpointError(
                f"the {self.key} text encoder weights do not fit {self.key} of this model family ({details})"
            )
        self.load_state_dict(ours, strict=True, assign=assign)

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """Our weights in the checkpoint's own layout (HF for CLIP-L, open_clip otherwise), no prefix."""
        sd = dict(self.state_dict())
        return open_clip_to_hf(sd) if self.config.checkpoint_layout == "hf" else sd
