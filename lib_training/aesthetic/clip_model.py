"""The full CLIP model an aesthetic embedding is made with: its image tower, and its text projection.

The extension uses OpenAI's CLIP ViT-L/14 (768-wide features). Here the model is any open_clip
architecture: by default ViT-L-14 with the `openai` weights, downloaded by open_clip when there is
network access, or read from a local weights file in open_clip's layout (`--clip-weights FILE`,
`.safetensors`, or a pickle read with `weights_only=True`).

SD1's and SDXL's CLIP-L are stored in checkpoints without their text projection, so the features
of a prompt cannot be computed from the checkpoint alone; as in the extension, the projection of
the full CLIP model is used (`text_projection`, [768, 768] for ViT-L/14). It is kept in the user
cache after the first download, so applying an embedding later works offline. For the projection
alone, a transformers `CLIPModel` file also does (the extension's own source of CLIP, e.g.
`openai/clip-vit-large-patch14`'s `model.safetensors`); making embeddings needs open_clip's layout.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lib_training.errors import UserError
from lib_training.formats.tensor_files import open_tensors, save_safetensors
from lib_training.user_cache import cache_root

DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "openai"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_PREFIXES = ("state_dict.", "module.")  # nesting of some training checkpoints
_HF_PROJECTION = "text_projection.weight"  # transformers' CLIPModel: Linear [P, W]


@dataclass(frozen=True)
class ClipSource:
    """Which CLIP model: an open_clip architecture name, and a local weights file or a pretrained tag."""

    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED  # open_clip's tag, used to download when `weights` is None
    weights: Path | None = None

    def describe(self) -> str:
        return f"{self.model} ({self.weights if self.weights else self.pretrained})"

    def check(self) -> None:
        """A UserError for an unknown architecture or a missing weights file (before any slow work)."""
        import open_clip

        if open_clip.get_model_config(self.model) is None:
            raise UserError(
                f"unknown CLIP model {self.model!r}; give an open_clip architecture name such as {DEFAULT_MODEL}"
            )
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(
                f"CLIP weights file not found: {self.weights}. Give the path of the CLIP model's weights in "
                f"open_clip's layout (for {DEFAULT_MODEL} with OpenAI's weights: open_clip_pytorch_model.bin or "
                "open_clip_model.safetensors from timm/vit_large_patch14_clip_224.openai), or leave it empty to "
                "download them"
            )

    def feature_width(self) -> int:
        """Width of the model's image and text features (its `embed_dim`), without loading weights."""
        import open_clip

        self.check()
        if self.weights is not None:
            with open_tensors(self.weights) as source:
                key = _find_key(source.keys(), "text_projection")
                if key is not None:
                    return int(source.shape(key)[1])
                key = _find_key(source.keys(), _HF_PROJECTION)
                if key is not None:
                    return int(source.shape(key)[0])
        return int(open_clip.get_model_config(self.model)["embed_dim"])


def _find_key(keys: Any, name: str) -> str | None:
    for key in keys:
        if key == name or any(key == prefix + name for prefix in _PREFIXES):
            return key
    return None


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _quick_gelu(source: ClipSource) -> bool:
    """OpenAI's CLIP models use QuickGELU; open_clip knows it from the pretrained tag's config."""
    import open_clip

    if source.pretrained == "openai":
        return True
    get_cfg = getattr(open_clip, "get_pretrained_cfg", None)
    cfg = get_cfg(source.model, source.pretrained) if get_cfg else {}
    return bool((cfg or {}).get("quick_gelu", False))


def load_clip_model(source: ClipSource, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """(open_clip model in eval mode, fp32 on `device`; its image preprocessing)."""
    import open_clip

    source.check()
    if source.weights is None:
        try:
            model = open_clip.create_model(source.model, pretrained=source.pretrained, device="cpu")
        except Exception as error:  # network errors, unknown tags: open_clip raises many kinds
            raise UserError(
                f"cannot load the CLIP model {source.describe()} ({error}); without network access give a "
                "local weights file (--clip-weights FILE)"
            ) from error
    else:
        model = open_clip.create_model(source.model, pretrained=None, force_quick_gelu=_quick_gelu(source))
        with open_tensors(source.weights) as tensors:
            state = _strip_prefixes(tensors.load_all())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserError(
                f"{Path(source.weights).name} does not hold the weights of the open_clip model {source.model} "
                f"({str(error).splitlines()[0]}); give --clip-model the architecture the file was made for"
            ) from error
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    image_size = getattr(model.visual, "image_size", 224)
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    return model, preprocess


_projections: dict[ClipSource, Tensor] = {}
_projection_lock = threading.Lock()


def _cached_projection_path(source: ClipSource) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{source.model}-{source.pretrained}")
    return cache_root() / "aesthetic" / f"{safe}-text_projection.safetensors"


def text_projection(source: ClipSource) -> Tensor:
    """The CLIP model's text projection [text width, feature width], float32 on the CPU.

    Read from the weights file, or from the user cache, or taken from the downloaded model (and then
    kept in the cache). Kept in memory after the first call.
    """
    with _projection_lock:
        if source in _projections:
            return _projections[source]
        source.check()
        if source.weights is not None:
            with open_tensors(source.weights) as tensors:
                key = _find_key(tensors.keys(), "text_projection")
                hf_key = _find_key(tensors.keys(), _HF_PROJECTION)
                if key is not None:
                    projection = tensors.get(key).float()
                elif hf_key is not None:  # transformers' CLIPModel: a Linear [P, W]
                    projection = tensors.get(hf_key).float().T
                else:
                    raise UserError(
                        f"{Path(source.weights).name} has no text projection; give the full CLIP model's weights "
                        "(open_clip's layout, or transformers' CLIPModel for the projection alone)"
                    )
        else:
            cached = _cached_projection_path(source)
            if cached.is_file():
                with open_tensors(cached) as tensors:
                    projection = tensors.get("text_projection").float()
            else:
                model, _ = load_clip_model(source)
                projection = model.text_projection.detach().float().clone()
                with contextlib.suppress(OSError):  # a read-only home only costs a download next time
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    save_safetensors(cached, {"text_projection": projection})
        _projections[source] = projection.contiguous()
        return _projections[source]
