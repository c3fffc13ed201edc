"""Textual-inversion embedding files: every format the WebUIs read, and the two they write.

An embedding holds, per text encoder, vectors [n_vectors, width]: "clip_l" (SD1: 768 wide),
"clip_h" (SD2: 1024) or "clip_l" + "clip_g" (SDXL: 768 and 1280). The prompt token is the file
name without its extension.

Read (`read_embedding`):
- `.pt` / `.bin` from the WebUI: `string_to_param` with exactly one entry, plus `name`, `step`,
  `sd_checkpoint`, `sd_checkpoint_name`;
- any `.safetensors`, `.pt` or `.bin` holding exactly one tensor under any key (kohya's
  `emb_params`, diffusers' `{token: vector}`), or exactly `clip_l` and `clip_g` (SDXL);
- `.png` / `.webp` images from the WebUI's trainer: the `sd-ti-embedding` text chunk (base64 of
  JSON in which a tensor is `{"TORCHTENSOR": nested lists}`), or, when an image has no such
  chunk, the data the WebUI hides in the image's left and right borders.
A file with one unnamed tensor does not say which text encoder it is for: a 768-wide one is taken
as "clip_l" and a 1024-wide one as "clip_h", or the caller says what the model expects.

Write (`write_embedding`): `.safetensors` (SD1/SD2 one tensor `emb_params`, SDXL `clip_l` and
`clip_g`; name, step and metadata in the header) or `.pt` as the WebUI writes it. Tensors are
written detached, contiguous, float32 and on the CPU; the WebUIs convert embeddings to float32
on load anyway, and they are small.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.pt_format import save_pt_for_webui
from lib_training.formats.tensor_files import open_tensors, save_safetensors

# The text-encoder keys of each layout, and the usual widths of those encoders.
LAYOUTS = {"SD1": ("clip_l",), "SD2": ("clip_h",), "SDXL": ("clip_l", "clip_g")}
STANDARD_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}

READ_SUFFIXES = (".safetensors", ".pt", ".bin", ".png", ".webp")
WRITE_SUFFIXES = (".safetensors", ".pt")
IMAGE_SUFFIXES = (".png", ".webp")

PNG_TEXT_KEY = "sd-ti-embedding"
WEBUI_TOKEN_ID = 265  # what the WebUI stores in string_to_token; loaders ignore it
SAFETENSORS_KEY = "emb_params"  # kohya's key for a single SD1/SD2 tensor


@dataclass
class EmbeddingFile:
    """One textual-inversion embedding: vectors per text-encoder key, [n_vectors, width] each.

    `metadata` holds string facts (e.g. "sd_checkpoint", "sd_checkpoint_name"); `name` and
    `step` are kept apart. Vectors of shape [width] are made [1, width].
    """

    name: str
    vectors: dict[str, Tensor]
    step: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = {key: v[None] if v.ndim == 1 else v for key, v in self.vectors.items()}
        if set(self.vectors) not in [set(keys) for keys in LAYOUTS.values()]:
            raise ValueError(f"embedding vectors need the keys of one layout {LAYOUTS}, got {sorted(self.vectors)}")
        shapes = {key: tuple(v.shape) for key, v in self.vectors.items()}
        if any(len(s) != 2 or s[0] < 1 for s in shapes.values()) or len({s[0] for s in shapes.values()}) != 1:
            raise ValueError(f"embedding vectors must be [n_vectors, width] with one n_vectors, got {shapes}")

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def layout(self) -> str:
        """The layout, "SD1", "SD2" or "SDXL", told by the text-encoder keys."""
        return _layout_of(self.vectors)

    def widths(self) -> dict[str, int]:
        return {key: v.shape[1] for key, v in self.vectors.items()}


def _layout_of(keys: Mapping[str, object]) -> str:
    for layout, layout_keys in LAYOUTS.items():
        if set(keys) == set(layout_keys):
            return layout
    raise ValueError(f"text-encoder keys {sorted(keys)} match no layout; expected one of {LAYOUTS}")


# --- reading --------------------------------------------------------------------------------------


def read_embedding(path: str | os.PathLike[str], expect: Mapping[str, int] | None = None) -> EmbeddingFile:
    """Read an embedding file of any supported format.

    `expect` maps the model's text-encoder keys to their widths (`{e.key: e.width for e in
    model.text_encoders}`); when given, the file must fit it, and a single unnamed tensor goes to
    that key whatever its width is called. Raises CheckpointError naming the file and the problem:
    not an embedding, several embeddings in one file, or an embedding for another model family.
    """
    path = Path(path)
    if expect is not None:
        _layout_of(expect)  # a wrong `expect` is a bug, not a user error
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(f"file not found: {path}")
        data = _read_image_data(path)
        tensors: dict[str, Tensor] = {}
        extras: dict[str, Any] = {}
        _flatten(data, "", tensors, extras)
        stored_name = extras.get("name")
        name = stored_name if isinstance(stored_name, str) and stored_name else path.stem
        metadata: dict[str, str] = {}
    elif suffix in (".safetensors", ".pt", ".bin"):
        with open_tensors(path) as source:
            tensors = source.load_all()
            extras = dict(source.extras)
            metadata = dict(source.metadata)
        name = path.stem
    else:
        raise CheckpointError(f"{path.name} is not an embedding file: expected one of {', '.join(READ_SUFFIXES)}")

    vectors = _pick_vectors(path, tensors, expect)
    step = _step_from(extras.get("step"), metadata.get("step"))
    for key in ("sd_checkpoint", "sd_checkpoint_name"):
        if extras.get(key) is not None:
            metadata.setdefault(key, str(extras[key]))
    metadata.pop("name", None)
    metadata.pop("step", None)
    return EmbeddingFile(name, vectors, step, metadata)


def _pick_vectors(path: Path, tensors: dict[str, Tensor], expect: Mapping[str, int] | None) -> dict[str, Tensor]:
    """The vectors per text-encoder key among a file's (flattened) tensors."""
    in_params = {k: v for k, v in tensors.items() if k.startswith("string_to_param.")}
    if in_params:
        if len(in_params) != 1:
            names = ", ".join(k.removeprefix("string_to_param.") for k in in_params)
            raise CheckpointError(
                f"{path.name} holds {len(in_params)} embeddings in string_to_param ({names}); an embedding "
                "file holds exactly one"
            )
        found: dict[str, Tensor] = {"": next(iter(in_params.values()))}
    elif {"clip_l", "clip_g"} <= set(tensors):
        if set(tensors) != {"clip_l", "clip_g"}:
            extra = sorted(set(tensors) - {"clip_l", "clip_g"})
            raise CheckpointError(
                f"{path.name} holds clip_l and clip_g (an SDXL embedding) but also {', '.join(extra[:5])}; "
                "an SDXL embedding file holds exactly clip_l and clip_g"
            )
        found = {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    elif len(tensors) == 1:
        found = {"": next(iter(tensors.values()))}
    elif not tensors:
        raise CheckpointError(f"{path.name} holds no tensors, so it is not a textual-inversion embedding")
    else:
        listed = ", ".join(list(tensors)[:5]) + (", ..." if len(tensors) > 5 else "")
        raise CheckpointError(
            f"{path.name} holds {len(tensors)} tensors ({listed}), so it is not a textual-inversion "
            "embedding: an embedding file holds one tensor [vectors, width] (SD1, SD2) or clip_l and "
            "clip_g (SDXL)"
        )

    for key, tensor in found.items():
        if tensor.ndim not in (1, 2) or tensor.numel() == 0:
            where = f" {key}" if key else ""
            raise CheckpointError(
                f"{path.name}: the embedding{where} has shape {list(tensor.shape)}; expected [vectors, width]"
            )
    found = {key: _as_vectors(t) for key, t in found.items()}
    if "" in found:
        return {_key_for_single(path, found[""], expect): found[""]}
    if found["clip_l"].shape[0] != found["clip_g"].shape[0]:
        raise CheckpointError(
            f"{path.name}: clip_l has {found['clip_l'].shape[0]} vectors but clip_g has "
            f"{found['clip_g'].shape[0]}; an SDXL embedding has as many of each"
        )
    if expect is not None:
        _check_fits(path, found, expect)
    return found


def _as_vectors(tensor: Tensor) -> Tensor:
    """[width] or [n, width] -> [n, width], detached, float32, contiguous, on the CPU."""
    tensor = tensor.detach().to("cpu", torch.float32)
    return (tensor[None] if tensor.ndim == 1 else tensor).contiguous()


def _key_for_single(path: Path, tensor: Tensor, expect: Mapping[str, int] | None) -> str:
    width = tensor.shape[1]
    if expect is None:
        for key in ("clip_l", "clip_h"):
            if width == STANDARD_WIDTHS[key]:
                return key
        raise CheckpointError(
            f"{path.name} holds {width}-wide vectors, which is not the width of SD1 (768) or SD2 (1024) "
            "text embeddings; load it with the model it was made for"
        )
    if len(expect) == 1:
        key, expected_width = next(iter(expect.items()))
        if width == expected_width:
            return key
    raise _mismatch(path, {"": width}, expect)


def _check_fits(path: Path, found: Mapping[str, Tensor], expect: Mapping[str, int]) -> None:
    widths = {key: t.shape[1] for key, t in found.items()}
    if widths != dict(expect):
        raise _mismatch(path, widths, expect)


def _mismatch(path: Path, widths: Mapping[str, int], expect: Mapping[str, int]) -> CheckpointError:
    """The error for a file whose vectors (widths per key; "" for an unnamed tensor) do not fit the model."""
    model, needed = _layout_of(expect), _describe_widths(expect)
    family = _family_of_file(widths)
    if family is not None and family != model:
        problem = f"this embedding is for {family} ({_describe_widths(widths)}) but the model is {model} ({needed})"
    else:
        problem = f"this embedding has {_describe_widths(widths)} but the model ({model}) needs {needed}"
    return CheckpointError(
        f"{path.name}: {problem}. Use an embedding made for this model, or load the model it was made for."
    )


def _family_of_file(widths: Mapping[str, int]) -> str | None:
    if set(widths) == {"clip_l", "clip_g"}:
        return "SDXL"
    return {768: "SD1", 1024: "SD2"}.get(next(iter(widths.values())))


def _describe_widths(widths: Mapping[str, int]) -> str:
    if len(widths) == 1:
        return f"{next(iter(widths.values()))}-wide vectors"
    return " and ".join(f"{key} {width} wide" for key, width in widths.items())


def _step_from(extra: Any, text: str | None) -> int | None:
    if isinstance(extra, int) and not isinstance(extra, bool):
        return extra
    if text is not None and text.strip().isdigit():
        return int(text)
    return None


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor], extras: dict[str, Any]) -> None:
    """Nested dicts -> dotted keys, as `open_tensors` gives them for pickles."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), tensors, extras)
    else:
        extras[prefix] = obj


# --- embeddings in images ------------------------------------------------------------------------


def _read_image_data(path: Path) -> dict[str, Any]:
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", None) or {}
            if PNG_TEXT_KEY in text:
                return _decode_text_chunk(path, text[PNG_TEXT_KEY])
            data = _decode_image_borders(image)
    except (UnidentifiedImageError, OSError) as error:
        raise CheckpointError(f"{path.name} could not be opened as an image: {error}") from error
    if data is None:
        raise CheckpointError(
            f"{path.name} holds no embedding: it has no {PNG_TEXT_KEY!r} text chunk and no embedding data in "
            "its borders. Only images saved by the WebUI's textual-inversion trainer carry one."
        )
    return data


def _json_tensor(obj: dict[str, Any]) -> Any:
    """JSON object hook: the WebUI writes a tensor as {"TORCHTENSOR": nested lists of numbers}."""
    if "TORCHTENSOR" in obj:
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32)
    return obj


def _decode_text_chunk(path: Path, text: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(base64.b64decode(text), object_hook=_json_tensor)
    except (binascii.Error, ValueError, TypeError) as error:
        raise CheckpointError(f"{path.name}: its {PNG_TEXT_KEY!r} text is not a valid embedding ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: its {PNG_TEXT_KEY!r} text is not a valid embedding")
    return data


def _lcg_mask(count: int) -> np.ndarray:
    """The WebUI's fixed pseudo-random byte sequence (LCG from seed 0, each state mod 255), low 4 bits."""
    state, values = 0, np.empty(count, dtype=np.uint8)
    for index in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        values[index] = state % 255
    return values & 0x0F


def _decode_image_borders(image: Image.Image) -> dict[str, Any] | None:
    """The embedding hidden in an image's borders by the WebUI's trainer, or None when there is none.

    Layout: [low block | black column | picture | black column | high block], each block holding
    the low (resp. high) 4 bits of the zlib-compressed JSON in the low 4 bits of its pixels' RGB
    values (row-major over [rows, columns, 3]), XORed with `_lcg_mask`; the high 4 bits of the
    pixels only draw a pattern. The image is first cropped to the pixels whose channels are all
    non-zero.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    lit = (pixels > 0).all(axis=2)
    if not lit.any():
        return None
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    nibbles = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    dark = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)  # columns with no data bits
    if dark.size < 2:
        return None
    low, high = nibbles[:, : dark[0]], nibbles[:, dark[-1] + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    mask = _lcg_mask(low.size).reshape(low.shape)
    packed = (((high ^ mask) << 4) | (low ^ mask)).astype(np.uint8).tobytes()
    try:
        raw = zlib.decompressobj().decompress(packed)  # the blocks are padded after the stream
        data = json.loads(raw, object_hook=_json_tensor)
    except (zlib.error, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- writing --------------------------------------------------------------------------------------


def write_embedding(path: str | os.PathLike[str], embedding: EmbeddingFile, *, overwrite: bool = True) -> Path:
    """Write `embedding` as `.safetensors` or `.pt`, chosen by the suffix of `path`, atomically.

    `.safetensors`: SD1/SD2 one tensor `emb_params` [n, width], SDXL `clip_l` and `clip_g`; the
    header's metadata holds `metadata`, then "name" and "step". `.pt` (the WebUI's format):
    SD1/SD2 `string_to_param` {"*": tensor} with `string_to_token`, `name`, `step`,
    `sd_checkpoint` and `sd_checkpoint_name` (from `metadata`; other metadata is not kept);
    SDXL a plain {"clip_l", "clip_g"} dict and nothing else, because the WebUI's loader takes
    every value of such a dict for a tensor. Raises ConfigError for another suffix, or when the
    file exists and `overwrite` is False.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ConfigError(f"cannot write an embedding as {path.name}: use a name ending in .safetensors or .pt")
    if not overwrite and path.exists():
        raise ConfigError(f"{path} already exists; choose another name, or allow overwriting to replace it")
    # clone(): a tensor that is a view of a larger one (a row of a token-embedding matrix) would
    # otherwise take its whole storage into a .pt file.
    vectors = {key: _as_vectors(t).clone() for key, t in embedding.vectors.items()}
    is_sdxl = embedding.layout == "SDXL"
    if suffix == ".safetensors":
        tensors = {k: vectors[k] for k in LAYOUTS["SDXL"]} if is_sdxl else {SAFETENSORS_KEY: _single(vectors)}
        metadata = {**embedding.metadata, "name": embedding.name}
        if embedding.step is not None:
            metadata["step"] = str(embedding.step)
        save_safetensors(path, tensors, metadata)
        return path
    if is_sdxl:
        obj: dict[str, Any] = {k: vectors[k] for k in LAYOUTS["SDXL"]}
    else:
        obj = {
            "string_to_token": {"*": WEBUI_TOKEN_ID},
            "string_to_param": {"*": _single(vectors)},
            "name": embedding.name,
            "step": embedding.step,
            "sd_checkpoint": embedding.metadata.get("sd_checkpoint"),
            "sd_checkpoint_name": embedding.metadata.get("sd_checkpoint_name"),
        }
    return save_pt_for_webui(path, obj)


def _single(vectors: Mapping[str, Tensor]) -> Tensor:
    (tensor,) = vectors.values()
    return tensor
