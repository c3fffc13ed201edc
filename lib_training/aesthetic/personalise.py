"""Applying an aesthetic embedding: a text tower personalised per prompt, mixed into the conditioning.

What the aesthetic-gradients extension does for each prompt (chunk of 75 tokens), with its controls:

1. target = the embedding's normalised features; with "text for images" T, the text features t of
   T (unnormalised; if "is negative": normalise(target - t)) and target = slerp(target, t, angle);
2. a copy of the text tower is tuned for `steps` Adam steps (learning rate `lr`, every parameter
   of the tower but the projection) on loss = -mean(normalise(text features of the prompt) . target);
3. zn = the tuned tower's conditioning of the prompt; the conditioning becomes (1 - w) z + w zn,
   or slerp(z, zn, w) ("slerp interpolation"). Its slerp runs along dimension 1 of the tensors it
   gets: the 77 tokens of [B, 77, C] conditionings, the features of [1, D] vectors; so does ours.
   Nothing happens when steps, lr or w is 0.

Here (the differences are the issue's point, the arithmetic is the same):
- any tower whose feature width fits the embedding: SD1's CLIP-L (features through the full CLIP
  model's projection, as in the extension), SD2's OpenCLIP-H and SDXL's bigG (their own
  projection; bigG's pooled output is mixed like its hidden states), SDXL's CLIP-L (likewise);
- the private copy is made once per model (`PrivateTower`) and reset from the host's weights
  before each prompt, instead of a deep copy per image; it never shares a tensor with the host;
- each prompt of a batch is personalised on its own and the result cached per (tower weights,
  tokens, textual-inversion vectors, steps, lr, text settings, embedding): a second image with
  the same prompt costs one lookup. (The extension optimises a batch's prompts together; for a
  batch of one prompt, or of copies of one prompt, that is the same.)
- textual-inversion vectors in the prompt are kept in the copy's input, where the extension sees
  only their placeholder tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lib_training.aesthetic.clip_model import ClipSource, text_projection
from lib_training.aesthetic.embedding_file import AestheticEmbedding
from lib_training.errors import ConfigError, UserError
from lib_training.model.diffusion import DiffusionModel, TextEncoder, TextEncoderOutput
from lib_training.model.networks.text_encoder import ClipTextEncoder, TowerWeights

CONTEXT_TOKENS = 77
_NOT_TRAINED = ("text_projection", "logit_scale")  # the extension tunes `text_model` only
_EMBEDDING = "token_embedding.weight"


@dataclass(frozen=True)
class AestheticSettings:
    """The extension's controls, with its UI defaults."""

    weight: float = 0.9  # 0 = the original conditioning, 1 = the personalised one
    steps: int = 5
    lr: float = 0.0001
    slerp: bool = False  # mix by spherical interpolation instead of linearly
    slerp_angle: float = 0.1  # how far "text for images" turns the target
    text: str = ""  # text for images: turns the target towards (or away from) this text
    text_negative: bool = False  # turn away from the text

    def check(self) -> None:
        problems = []
        if not 0.0 <= self.weight <= 1.0:
            problems.append(f"aesthetic weight must be between 0 and 1 (got {self.weight})")
        if self.steps < 0:
            problems.append(f"aesthetic steps must be 0 or more (got {self.steps})")
        if self.lr < 0 or self.lr != self.lr:
            problems.append(f"aesthetic learning rate must be 0 or more (got {self.lr})")
        if not 0.0 <= self.slerp_angle <= 1.0:
            problems.append(f"slerp angle must be between 0 and 1 (got {self.slerp_angle})")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def active(self) -> bool:
        """Whether the conditioning changes at all (the extension skips when any of these is 0)."""
        return self.steps != 0 and self.lr != 0 and self.weight != 0

    def infotext(self, embedding_name: str) -> dict[str, Any]:
        """The generation parameters the extension writes (its names, so "send to txt2img" restores them)."""
        return {
            "Aesthetic LR": self.lr,
            "Aesthetic weight": self.weight,
            "Aesthetic steps": self.steps,
            "Aesthetic embedding": embedding_name,
            "Aesthetic slerp": self.slerp,
            "Aesthetic text": self.text,
            "Aesthetic text negative": self.text_negative,
            "Aesthetic slerp angle": self.slerp_angle,
        }


def format_parameters(params: Mapping[str, Any]) -> str:
    """Generation parameters as the WebUIs write them in an infotext line: `Key: value, ...`, a value
    holding a comma, colon, quote or newline written as a JSON string."""

    def quote(value: Any) -> str:
        text = str(value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',\n:"') else text

    return ", ".join(f"{key}: {quote(value)}" for key, value in params.items())


def slerp(low: Tensor, high: Tensor, t: float) -> Tensor:
    """Spherical interpolation between `low` and `high` along dimension 1 (see the module docstring).

    Where the two are parallel (the extension would divide by zero) it interpolates linearly.
    """
    low_n = low / low.norm(dim=1, keepdim=True)
    high_n = high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((low_n * high_n).sum(1).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    parallel = so.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(so), so)
    a = torch.where(parallel, torch.full_like(so, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    b = torch.where(parallel, torch.full_like(so, t), torch.sin(t * omega) / safe)
    return a.unsqueeze(1) * low + b.unsqueeze(1) * high


def mix(original: Tensor, personalised: Tensor, settings: AestheticSettings) -> Tensor:
    """The conditioning the UNet gets: `original` moved towards `personalised` by the weight."""
    z, zn = original.float(), personalised.to(original.device, torch.float32)
    out = slerp(z, zn, settings.weight) if settings.slerp else z * (1 - settings.weight) + zn * settings.weight
    return out.to(original.dtype)


def tower_weights(encoder: TextEncoder) -> TowerWeights:
    get = getattr(encoder, "tower_weights", None)
    if get is None:
        raise UserError(
            f"the {encoder.key} text encoder of this model ({type(encoder).__name__}) cannot be copied for "
            "aesthetic gradients"
        )
    return get()


class PrivateTower:
    """A private fp32 copy of one text tower (our `ClipTextEncoder`), with a projection to features.

    Made once; `reset` copies the source's current weights into it before each personalisation.
    """

    def __init__(self, source: TextEncoder, projection: Tensor | None, device: torch.device) -> None:
        weights = tower_weights(source)
        config = weights.config
        self.source_pooled = config.pooled_output
        self.projection = None
        if config.projection_dim is None:
            if projection is None or projection.shape[0] != config.width:
                got = "none" if projection is None else f"[{projection.shape[0]}, {projection.shape[1]}]"
                raise UserError(
                    f"the CLIP model's text projection ({got}) does not fit this model's {source.key} "
                    f"({config.width} wide); give the CLIP model whose text tower it is (ViT-L-14 for CLIP-L)"
                )
            self.projection = projection
            config = replace(config, projection_dim=int(projection.shape[1]))
        config = replace(config, pooled_output=True)  # the pooled output is the text features
        with torch.inference_mode(False):
            with torch.device("meta"):
                module = ClipTextEncoder(config, tokenizer=source.tokenizer)  # type: ignore[arg-type]
            self.module = module.to_empty(device=device).float()
        self.module.clip_skip = weights.clip_skip
        self.device = device
        # The token embedding is never trained in place: only the rows a prompt uses can change (Adam
        # leaves rows without gradient exactly as they are), so those rows are trained as a small
        # parameter of their own (`rows`) and the [vocab, W] matrix is copied only when the source changes.
        self.trainable = [p for n, p in self.module.named_parameters() if n not in (*_NOT_TRAINED, _EMBEDDING)]
        for name, param in self.module.named_parameters():
            param.requires_grad_(name not in (*_NOT_TRAINED, _EMBEDDING))
        self._embedding_version: int | None = None
        self.reset(weights)

    def reset(self, weights: TowerWeights) -> None:
        """Copy the source's weights (and the CLIP projection) into the private tower."""
        with torch.inference_mode(False), torch.no_grad():
            params = dict(self.module.named_parameters())
            for name, tensor in weights.state.items():
                if name in params and (name != _EMBEDDING or self._embedding_version != weights.version):
                    params[name].copy_(tensor)
            self._embedding_version = weights.version
            if self.projection is not None:
                params["text_projection"].copy_(self.projection)
            self.module.clip_skip = weights.clip_skip

    def rows(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(the token-embedding rows of the distinct ids [U, W] as a new trainable leaf, the index [1, 77]
        of each token among them), so that rows[index] equals token_embedding(ids)."""
        unique, index = torch.unique(ids, return_inverse=True)
        rows = self.module.token_embedding.weight.detach()[unique].clone().requires_grad_(True)
        return rows, index

    def features(self, embeds: Tensor, ids: Tensor) -> Tensor:
        """Text features [B, P] (not normalised) of token embeddings [B, 77, W]."""
        return self.module.encode_embeddings(embeds, ids).pooled  # type: ignore[return-value]


def _digest(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()[:32]


class Personaliser:
    """Personalises the text towers of one model; keeps the private towers and the results.

    `optimisations` counts the personalisations run (cache misses), for tests and benchmarks;
    `similarity` is the last one's cosine similarity of the text features to the target before the
    first step and after the last.
    """

    def __init__(self, model: DiffusionModel, clip: ClipSource | None = None, cache_size: int = 64) -> None:
        self.model = model
        self.clip = clip or ClipSource()
        self.cache_size = cache_size
        self.optimisations = 0
        self.similarity: tuple[float | None, float] | None = None
        self._towers: dict[str, PrivateTower] = {}
        self._cache: OrderedDict[tuple[Any, ...], tuple[Tensor, Tensor | None]] = OrderedDict()
        self._lock = threading.RLock()

    # --- which tower gets which embedding -----------------------------------------------------
    def feature_width(self, encoder: TextEncoder) -> int:
        """Width of the text features of `encoder` (its projection's, or the CLIP model's)."""
        config = tower_weights(encoder).config
        if config.projection_dim is not None:
            return config.projection_dim
        return self.clip.feature_width()

    def match(self, embeddings: Sequence[AestheticEmbedding]) -> dict[str, AestheticEmbedding]:
        """Text encoder key -> the embedding applied to it: each embedding goes to every encoder
        whose features have its width. A UserError when one fits none, or two fit the same."""
        widths: dict[str, int | UserError] = {}
        for encoder in self.model.text_encoders:
            try:
                widths[encoder.key] = self.feature_width(encoder)
            except UserError as error:  # CLIP-L's projection unavailable: only an error if it was needed
                widths[encoder.key] = error
        assigned: dict[str, AestheticEmbedding] = {}
        for embedding in embeddings:
            keys = [key for key, width in widths.items() if width == embedding.width]
            if not keys:
                unknown = [w for w in widths.values() if isinstance(w, UserError)]
                if unknown:
                    raise unknown[0]
                known = ", ".join(f"{key} {width}" for key, width in widths.items())
                raise UserError(
                    f"the aesthetic embedding {embedding.name!r} is {embedding.width} wide, but the text features of "
                    f"this {self.model.family.name} model are {known} wide; make the embedding with a CLIP model of "
                    "that width (CLIP-L of SD1 and SDXL: ViT-L-14, 768; SD2: ViT-H-14, 1024; SDXL's bigG: "
                    "ViT-bigG-14, 1280)"
                )
            for key in keys:
                if key in assigned:
                    raise UserError(
                        f"the aesthetic embeddings {assigned[key].name!r} and {embedding.name!r} both fit the {key} "
                        "text encoder; give one per encoder"
                    )
                assigned[key] = embedding
        return assigned

    # --- personalising ------------------------------------------------------------------------
    def prepare(self, embeddings: Mapping[str, AestheticEmbedding]) -> None:
        """Make the private towers of the encoders `embeddings` are for (CLIP-L's projection loaded):
        a missing CLIP weights file or download fails here, before any sampling."""
        for encoder in self.model.text_encoders:
            if encoder.key in embeddings:
                self.tower(encoder)

    def tower(self, encoder: TextEncoder) -> PrivateTower:
        with self._lock:
            if encoder.key not in self._towers:
                config = tower_weights(encoder).config
                projection = text_projection(self.clip) if config.projection_dim is None else None
                self._towers[encoder.key] = PrivateTower(encoder, projection, self.model.device)
            return self._towers[encoder.key]

    def apply(
        self,
        encoder: TextEncoder,
        out: TextEncoderOutput,
        embeds: Tensor,
        ids: Tensor,
        embedding: AestheticEmbedding,
        settings: AestheticSettings,
    ) -> TextEncoderOutput:
        """`out`, the encoder's output for one chunk (embeds [B, 77, W], ids [B, 77]), mixed with the
        personalised tower's output for each prompt of the batch."""
        if not settings.active:
            return out
        with self._lock:
            hidden, pooled = self.personalised(encoder, embeds, ids, embedding, settings)
        mixed_pooled = out.pooled
        if out.pooled is not None and pooled is not None:
            mixed_pooled = mix(out.pooled, pooled, settings)
        return TextEncoderOutput(mix(out.hidden, hidden, settings), mixed_pooled)

    @torch.no_grad()
    def personalised(
        self,
        encoder: TextEncoder,
        embeds: Tensor,
        ids: Tensor,
        embedding: AestheticEmbedding,
        settings: AestheticSettings,
    ) -> tuple[Tensor, Tensor | None]:
        """The personalised tower's (hidden [B, 77, C], pooled [B, P] or None) for a chunk, from the
        cache or personalised row by row."""
        tower = self.tower(encoder)
        weights = tower_weights(encoder)
        device = self.model.device
        ids = ids.to(device)
        base = encoder.token_embedding(ids.to(encoder.token_embedding.weight.device)).to(device)
        embeds = embeds.to(device)
        given = (embeds.to(base.dtype) != base).any(dim=-1, keepdim=True)  # [B, 77, 1]: textual-inversion vectors
        text_key = (settings.text, settings.text_negative, settings.slerp_angle) if settings.text else ("",)
        shared = (encoder.key, weights.version, weights.clip_skip, settings.steps, settings.lr)
        shared += (*text_key, embedding.digest)
        hidden_rows, pooled_rows = [], []
        for row in range(ids.shape[0]):
            row_ids, row_given = ids[row : row + 1], given[row : row + 1]
            vectors = embeds[row : row + 1][row_given.expand_as(embeds[row : row + 1])]
            key = (*shared, tuple(row_ids[0].tolist()), _digest(vectors) if vectors.numel() else "")
            result = self._cache.get(key)
            if result is None:
                result = self._personalise(
                    tower, weights, row_ids, embeds[row : row + 1], row_given, embedding, settings
                )
                self._cache[key] = result
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            hidden_rows.append(result[0])
            pooled_rows.append(result[1])
        hidden = torch.cat(hidden_rows)
        pooled = None if pooled_rows[0] is None else torch.cat(pooled_rows)  # type: ignore[arg-type]
        return hidden, pooled

    def _text_ids(self, encoder: TextEncoder, text: str) -> Tensor:
        tokenizer = encoder.tokenizer
        tokens = [tokenizer.bos_id, *tokenizer.encode(text)[: CONTEXT_TOKENS - 2], tokenizer.eos_id]
        ids = torch.full((1, CONTEXT_TOKENS), tokenizer.pad_id, dtype=torch.long)
        ids[0, : len(tokens)] = torch.tensor(tokens)
        return ids.to(self.model.device)

    def _personalise(
        self,
        tower: PrivateTower,
        weights: TowerWeights,
        ids: Tensor,
        embeds: Tensor,
        given: Tensor,
        embedding: AestheticEmbedding,
        settings: AestheticSettings,
    ) -> tuple[Tensor, Tensor | None]:
        """One prompt chunk (ids [1, 77]): tune the reset private tower, return its output."""
        self.optimisations += 1
        encoder = next(e for e in self.model.text_encoders if e.key == weights.config.key)
        with torch.inference_mode(False), torch.enable_grad():
            tower.reset(weights)
            ids, fixed, given = ids.clone(), embeds.clone().float(), given.clone()
            module = tower.module
            rows, index = tower.rows(ids)

            def inputs() -> Tensor:
                return torch.where(given, fixed, rows[index])  # [1, 77, W]

            target = embedding.target().to(self.model.device)  # [1, D]
            if settings.text:
                with torch.no_grad():
                    text_ids = self._text_ids(encoder, settings.text)
                    text = tower.features(module.token_embedding(text_ids), text_ids)  # [1, D]
                    if settings.text_negative:
                        text = target - text
                        text = text / text.norm(dim=-1, keepdim=True)
                    target = slerp(target, text, settings.slerp_angle)
            optimizer = torch.optim.Adam([rows, *tower.trainable], lr=settings.lr, foreach=True)
            # The features are read at the EOS token; attention is causal, so the tokens after it change
            # neither them nor any gradient: the steps run on the tokens up to EOS only.
            length = int(ids.argmax(dim=-1).max()) + 1
            first = None
            for _ in range(settings.steps):
                features = tower.features(inputs()[:, :length], ids[:, :length])
                features = features / features.norm(dim=-1, keepdim=True)
                loss = -(features @ target.T).mean()
                first = -loss.item() if first is None else first
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                out = module.encode_embeddings(inputs(), ids)
                final = torch.nn.functional.cosine_similarity(out.pooled, target).mean().item()  # type: ignore[arg-type]
        self.similarity = (first, final)
        pooled = out.pooled.detach() if tower.source_pooled else None
        return out.hidden.detach(), pooled


class AestheticTextEncoder:
    """A `TextEncoder` whose every output is mixed with the personalised tower's (wraps another)."""

    def __init__(
        self,
        inner: TextEncoder,
        personaliser: Personaliser,
        embedding: AestheticEmbedding,
        settings: AestheticSettings,
    ) -> None:
        self.inner = inner
        self.key = inner.key
        self.tokenizer = inner.tokenizer
        self.token_embedding = inner.token_embedding
        self.personaliser = personaliser
        self.embedding = embedding
        self.settings = settings

    @property
    def width(self) -> int:
        return self.inner.width

    def tower_weights(self) -> TowerWeights:
        return tower_weights(self.inner)

    def encode_embeddings(self, embeds: Tensor, ids: Tensor) -> TextEncoderOutput:
        out = self.inner.encode_embeddings(embeds, ids)
        return self.personaliser.apply(self.inner, out, embeds, ids, self.embedding, self.settings)


@contextlib.contextmanager
def aesthetic_applied(
    personaliser: Personaliser,
    embeddings: Mapping[str, AestheticEmbedding],
    settings: AestheticSettings,
) -> Iterator[DiffusionModel]:
    """While inside, the personaliser's model conditions through the personalised towers
    (`embeddings`: encoder key -> embedding, from `Personaliser.match`)."""
    model = personaliser.model
    personaliser.prepare(embeddings)
    originals = model.text_encoders
    model.text_encoders = [
        AestheticTextEncoder(e, personaliser, embeddings[e.key], settings) if e.key in embeddings else e
        for e in originals
    ]
    try:
        yield model
    finally:
        model.text_encoders = originals


class Personalisers:
    """One `Personaliser` per model and CLIP source, kept while that model is the one in use."""

    def __init__(self) -> None:
        self._current: Personaliser | None = None
        self._lock = threading.Lock()

    def for_model(self, model: DiffusionModel, clip: ClipSource | None = None) -> Personaliser:
        clip = clip or ClipSource()
        with self._lock:
            current = self._current
            if current is None or current.model is not model or current.clip != clip:
                self._current = Personaliser(model, clip)
            return self._current  # type: ignore[return-value]
