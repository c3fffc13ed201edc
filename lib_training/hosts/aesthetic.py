"""Aesthetic gradients in A1111 and Forge txt2img / img2img: the hook on the hosts' prompt encoding.

Both hosts encode a prompt chunk by chunk through their text engine's
`process_tokens(remade_batch_tokens, batch_multipliers)`, which returns the chunk's conditioning
[B, 77, C] (with `.pooled` set on SDXL's bigG): A1111's hijacked `cond_stage_model` (SD1, SD2) or
SDXL's two `conditioner.embedders`; Forge's `text_processing_engine` (SD1, SD2) or
`text_processing_engine_l` / `_g` (SDXL). The extension replaced `process_tokens` of A1111's SD1
model for good; here an instance attribute `process_tokens` is set on each engine whose tower fits
an embedding for one generation (the script's `process`) and deleted afterwards (`postprocess`, or
the next `process`). It calls the host's own method, then mixes in the personalised tower's output
(`Personaliser.apply`); the private towers are copies made from the adapter's `tower_weights`.

Only the text towers are used, so what training refuses (A1111's --lowvram and SD UNets, Forge's
quantised UNets) does not stop it. A1111 keeps the conditioning of the last prompts across
generations; a generation with aesthetic gradients gets empty caches of its own (`p.cached_c` and
the like, on the instance), so neither reuses the other's conditioning.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lib_training.aesthetic.clip_model import ClipSource
from lib_training.aesthetic.embedding_file import AestheticEmbedding, load_embedding
from lib_training.aesthetic.personalise import AestheticSettings, Personaliser
from lib_training.app.aesthetic_service import AestheticRequest
from lib_training.formats.family import Arch
from lib_training.model.diffusion import TextEncoder, TextEncoderOutput

_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")
_FORGE_ENGINES = {
    Arch.SD1: (("text_processing_engine", "clip_l"),),
    Arch.SD2: (("text_processing_engine", "clip_h"),),
    Arch.SDXL: (("text_processing_engine_l", "clip_l"), ("text_processing_engine_g", "clip_g")),
}


def is_forge(sd_model: Any) -> bool:
    return getattr(sd_model, "forge_objects_original", None) is not None


def text_engines(sd_model: Any) -> list[tuple[Any, str]]:
    """(engine with `process_tokens`, the text encoder key it runs) for the loaded model."""
    if is_forge(sd_model):
        from lib_training.hosts import forge

        return [(getattr(sd_model, name), key) for name, key in _FORGE_ENGINES[forge.model_arch(sd_model)]]
    from lib_training.hosts import a1111

    arch = a1111.model_arch(sd_model)
    if arch is Arch.SDXL:
        clip_l, clip_g = a1111._sdxl_towers(sd_model)  # type: ignore[misc]
        return [(clip_l, "clip_l"), (clip_g, "clip_g")]
    return [(sd_model.cond_stage_model, "clip_l" if arch is Arch.SD1 else "clip_h")]


def _host_model(sd_model: Any) -> Any:
    if is_forge(sd_model):
        from lib_training.hosts import forge

        return forge.build_model(sd_model)
    from lib_training.hosts import a1111

    return a1111.build_model(sd_model)


def _layer_settings() -> tuple[Any, ...]:
    """The host options that change which hidden state a tower conditions on."""
    from modules import shared

    opts = shared.opts
    return (getattr(opts, "CLIP_stop_at_last_layers", 1), getattr(opts, "sdxl_clip_l_skip", False))


def _fixes(engine: Any) -> list[Any] | None:
    """The textual-inversion vectors the host will place in this chunk (read before it consumes them)."""
    holder = getattr(engine, "hijack", None) or getattr(engine, "embeddings", None)
    fixes = getattr(holder, "fixes", None)
    return list(fixes) if fixes else None


def _splice(embeds: Tensor, fixes: list[Any] | None, key: str) -> Tensor:
    """Token embeddings [B, 77, W] with each fix's vectors placed after BOS + offset, as the hosts do."""
    if not fixes:
        return embeds
    embeds = embeds.clone()
    for row, row_fixes in enumerate(fixes):
        for offset, embedding in row_fixes or ():
            vectors = embedding.vec[key] if isinstance(embedding.vec, dict) else embedding.vec
            start = int(offset) + 1
            count = min(int(vectors.shape[0]), embeds.shape[1] - start - 1)
            if count > 0:
                embeds[row, start : start + count] = vectors[:count].to(embeds)
    return embeds


@dataclass
class _Session:
    """The personaliser of one loaded model (kept between generations for its cache)."""

    identity: tuple[Any, ...]
    personaliser: Personaliser
    installed: list[tuple[Any, Any, Any]] = field(default_factory=list)  # (engine, ours, the override before)


class AestheticHooks:
    """Installs and removes the `process_tokens` overrides; one per WebUI process."""

    def __init__(self) -> None:
        self._session: _Session | None = None
        self._lock = threading.Lock()

    def personaliser(self, sd_model: Any, clip: ClipSource) -> Personaliser:
        identity = (id(sd_model), _layer_settings(), clip)
        session = self._session
        if session is None or session.identity != identity:
            self.remove()
            session = _Session(identity, Personaliser(_host_model(sd_model), clip))
            self._session = session
        return session.personaliser

    def install(
        self,
        sd_model: Any,
        embeddings: Sequence[AestheticEmbedding],
        settings: AestheticSettings,
        clip: ClipSource,
    ) -> dict[str, AestheticEmbedding]:
        """Hook the engines whose towers fit `embeddings` (a UserError when one fits none)."""
        with self._lock:
            self.remove()
            personaliser = self.personaliser(sd_model, clip)
            assigned = personaliser.match(embeddings)
            personaliser.prepare(assigned)  # errors (CLIP weights) now, not in the middle of the generation
            encoders = {e.key: e for e in personaliser.model.text_encoders}
            for engine, key in text_engines(sd_model):
                if key in assigned:
                    previous = vars(engine).get("process_tokens")  # another extension's override, if any
                    hook = _make_hook(engine, encoders[key], personaliser, assigned[key], settings)
                    engine.process_tokens = hook
                    self._session.installed.append((engine, hook, previous))  # type: ignore[union-attr]
            return assigned

    def remove(self) -> None:
        """Delete our overrides (only ours: a later override by someone else stays)."""
        session = self._session
        if session is None:
            return
        for engine, hook, previous in reversed(session.installed):
            if vars(engine).get("process_tokens") is hook:
                if previous is None:
                    del engine.process_tokens
                else:
                    engine.process_tokens = previous
        session.installed.clear()


def _make_hook(
    engine: Any, encoder: TextEncoder, personaliser: Personaliser, embedding: AestheticEmbedding, settings: Any
) -> Any:
    original = engine.process_tokens  # the class's, or an override installed before ours
    tokenizer = encoder.tokenizer

    def process_tokens(remade_batch_tokens: Any, batch_multipliers: Any) -> Tensor:
        fixes = _fixes(engine)
        z = original(remade_batch_tokens, batch_multipliers)
        ids = torch.as_tensor(remade_batch_tokens, dtype=torch.long)  # [B, 77]
        if tokenizer.pad_id != tokenizer.eos_id:  # SD2 and bigG: padding after EOS, as the hosts make it
            for row in range(ids.shape[0]):
                ends = (ids[row] == tokenizer.eos_id).nonzero()
                if len(ends):
                    ids[row, int(ends[0]) + 1 :] = tokenizer.pad_id
        with torch.no_grad():
            embeds = encoder.token_embedding(ids.to(personaliser.model.device))
            embeds = _splice(embeds, fixes, encoder.key)
        out = personaliser.apply(
            encoder, TextEncoderOutput(z, getattr(z, "pooled", None)), embeds, ids, embedding, settings
        )
        mixed = out.hidden
        if out.pooled is not None:
            mixed.pooled = out.pooled
        return mixed

    return process_tokens


hooks = AestheticHooks()


def before_generation(p: Any, request: AestheticRequest | None, resolve: Any) -> None:
    """The script's `process`: hook the engines for this generation and write the infotext; nothing
    when no embedding is chosen or the settings change nothing. `resolve` maps a name to its file."""
    hooks.remove()
    if request is None or not request.embeddings:
        return
    request.settings.check()
    embeddings = [load_embedding(resolve(text)) for text in request.embeddings]
    # As the extension: the parameters go into the infotext whenever an embedding is chosen.
    p.extra_generation_params.update(request.settings.infotext(", ".join(e.name for e in embeddings)))
    if not request.settings.active:
        return
    hooks.install(p.sd_model, embeddings, request.settings, request.clip)
    for name in _CACHES:
        setattr(p, name, [None, None])


def after_generation(p: Any = None) -> None:
    """The script's `postprocess`: every override removed."""
    hooks.remove()


# --- the script's section ------------------------------------------------------------------------------
def build_section(is_img2img: bool) -> Any:
    """The txt2img / img2img section (the Generate panel's accordion), in the script's UI context."""
    from lib_training.app.ui.aesthetic_panel import build_aesthetic_panel
    from lib_training.hosts import extension

    tab = "img2img" if is_img2img else "txt2img"
    return build_aesthetic_panel(extension.service().aesthetic, elem_id=f"sdwt-{tab}-aesthetic")


def process(p: Any, *values: Any) -> None:
    """The script's `process` with the section's values."""
    from lib_training.app.ui.aesthetic_panel import AestheticPanel
    from lib_training.hosts import extension

    before_generation(p, AestheticPanel.request(*values), extension.service().aesthetic.resolve)
