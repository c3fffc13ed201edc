"""Block weights: which UNet block (or the text encoder, "BASE") each checkpoint key belongs to, and
the per-block ratios users give as 26 values (SD1/SD2) or 20 (SDXL), or as a preset name.

Blocks follow the merge-block-weighted convention that supermerger and sd-meh share:

- SD1/SD2 (26): BASE, IN00-IN11, M00, OUT00-OUT11. SDXL (20): BASE, IN00-IN08, M00, OUT00-OUT08.
- BASE is the text encoder(s). `input_blocks.N` is INnn, `middle_block` is M00, `output_blocks.N`
  is OUTnn.
- The time embedding (`time_embed.*`) and SDXL's vector embedding (`label_emb.*`) go with IN00,
  the final norm and convolution (`out.*`) with the last OUT block (OUT11, or OUT08 for SDXL), as
  in both tools.
- VAE, EMA and other keys have no block: their ratio comes from the per-component settings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from lib_training.errors import ConfigError
from lib_training.formats.detection import TEXT_ENCODERS, UNET_PREFIX
from lib_training.formats.family import Arch

BASE = "BASE"
_LEVELS = {Arch.SD1: 12, Arch.SD2: 12, Arch.SDXL: 9}  # input (and output) blocks per family


def block_names(arch: Arch) -> tuple[str, ...]:
    """The blocks of a family in the order their weights are given (26 for SD1/SD2, 20 for SDXL)."""
    count = _LEVELS[arch]
    return (BASE, *(f"IN{i:02d}" for i in range(count)), "M00", *(f"OUT{i:02d}" for i in range(count)))


def unet_block_names(arch: Arch) -> tuple[str, ...]:
    return block_names(arch)[1:]


_UNET_BLOCK = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)\.|(middle_block)\.|(time_embed|label_emb|out)\.)")


def block_of(key: str, arch: Arch) -> str | None:
    """The block of a checkpoint key, or None for keys outside the UNet and text encoders.

    Raises ConfigError for a UNet key that has no place in the family's block layout (a UNet with
    more blocks than the family has).
    """
    if any(key.startswith(slot.prefix) for slot in TEXT_ENCODERS[arch]):
        return BASE
    if not key.startswith(UNET_PREFIX):
        return None
    found = _UNET_BLOCK.match(key[len(UNET_PREFIX) :])
    if found is None:
        raise ConfigError(f"the UNet key {key!r} belongs to no block of the {arch.value} block layout")
    kind, index, middle, outer = found.groups()
    count = _LEVELS[arch]
    if middle:
        return "M00"
    if outer:
        return "IN00" if outer in ("time_embed", "label_emb") else f"OUT{count - 1:02d}"
    number = int(index)
    if number >= count:
        raise ConfigError(
            f"the UNet key {key!r} is in block {number}, beyond the {count} {kind} of the {arch.value} "
            "layout; this UNet does not have the family's usual structure, so block weights cannot apply"
        )
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{number:02d}"


# --- presets --------------------------------------------------------------------------------------
# Each preset gives the UNet blocks' ratios as a function of the block's position u in [0, 1]
# (IN00 at 0, M00 at 0.5, the last OUT block at 1), or of its name. BASE is left to the
# per-component ratio. 0 keeps model A, 1 takes model B (for weighted sum).


def _smoothstep(u: float) -> float:
    return u * u * (3 - 2 * u)


def _outer(arch: Arch) -> set[str]:
    """The blocks at the highest resolution: up to the first downsample, and the last output level."""
    count = _LEVELS[arch]
    return {f"IN{i:02d}" for i in range(4)} | {f"OUT{i:02d}" for i in range(count - 3, count)}


_Preset = Callable[[str, float, Arch], float]
PRESETS: dict[str, tuple[str, _Preset]] = {
    "in_to_out": ("ramp from 0 at IN00 to 1 at the last OUT block", lambda name, u, arch: u),
    "out_to_in": ("ramp from 1 at IN00 to 0 at the last OUT block", lambda name, u, arch: 1 - u),
    "smooth_in_to_out": (
        "smoothstep from 0 at IN00 to 1 at the last OUT block",
        lambda n, u, a: _smoothstep(u),
    ),
    "smooth_out_to_in": (
        "smoothstep from 1 at IN00 to 0 at the last OUT block",
        lambda n, u, a: 1 - _smoothstep(u),
    ),
    "v_shape": ("1 at both ends, falling linearly to 0 at M00", lambda name, u, arch: abs(2 * u - 1)),
    "a_shape": ("0 at both ends, rising linearly to 1 at M00", lambda name, u, arch: 1 - abs(2 * u - 1)),
    "cosine_v": (
        "1 at both ends, 0 at M00, following a cosine",
        lambda n, u, a: (1 + math.cos(2 * math.pi * u)) / 2,
    ),
    "inputs": ("1 for the IN blocks, 0 elsewhere", lambda name, u, arch: float(name.startswith("IN"))),
    "middle": ("1 for M00, 0 elsewhere", lambda name, u, arch: float(name == "M00")),
    "outputs": ("1 for the OUT blocks, 0 elsewhere", lambda name, u, arch: float(name.startswith("OUT"))),
    "outer": (
        "1 for the highest-resolution blocks (IN00-IN03 and the last three OUT), 0 elsewhere",
        lambda name, u, arch: float(name in _outer(arch)),
    ),
    "inner": (
        "0 for the highest-resolution blocks (IN00-IN03 and the last three OUT), 1 elsewhere",
        lambda name, u, arch: float(name not in _outer(arch)),
    ),
}


def preset(name: str, arch: Arch) -> dict[str, float]:
    """The UNet block ratios of a preset (BASE is not set by presets)."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown block preset {name!r}; presets are: {', '.join(PRESETS)}")
    rule = PRESETS[key][1]
    names = unet_block_names(arch)
    last = len(names) - 1
    return {block: round(rule(block, i / last, arch), 6) for i, block in enumerate(names)}


def parse_blocks(text: str, arch: Arch) -> dict[str, float]:
    """Per-block ratios from a preset name or comma-separated numbers (26 for SD1/SD2, 20 for SDXL).

    An empty text gives an empty dict (no block weights). Presets set only the UNet blocks.
    """
    text = text.strip()
    if not text:
        return {}
    if re.fullmatch(r"[A-Za-z_][\w-]*", text):
        return preset(text, arch)
    names = block_names(arch)
    parts = [part for part in re.split(r"[,\s]+", text) if part]
    values: list[float] = []
    for part in parts:
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(f"block weights: {part!r} is not a number") from None
    if len(values) != len(names):
        raise ConfigError(
            f"block weights for {arch.value.upper()} need {len(names)} comma-separated values "
            f"({names[0]}, {names[1]}-{names[_LEVELS[arch]]}, M00, OUT00-{names[-1]}); got {len(values)}. "
            f"Or give a preset: {', '.join(PRESETS)}."
        )
    if not all(math.isfinite(v) for v in values):
        raise ConfigError("block weights must be finite numbers")
    return dict(zip(names, values))
