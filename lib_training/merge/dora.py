"""DoRA's weight as A1111 and ComfyUI compute it from a kohya file's `dora_scale`: one formula for the hook
that applies a LoRA (`methods/lora/network.py`) and for the merge tools that bake or resize one.

For a weight W [out, in(, kh, kw)], the LoRA's update ΔW = (alpha / rank) · up @ down (same shape), and a
magnitude d = `dora_scale` in one of two layouts:

  per input channel, d [1, in(, 1, 1)] (kohya, A1111, LyCORIS' `wd_on_out=False`; what our training writes):
    W_dora = d ⊙ (W + ΔW) / ‖W + ΔW‖               ‖·‖ per input channel: over the output rows and the kernel
  per output channel, d [out, 1(, 1, 1)] (LyCORIS' default `wd_on_out=True`), as ComfyUI computes it:
    W_dora = d ⊙ (W + ΔW) / (‖W‖ + ε)               ‖·‖ per output row (over inputs and kernel), ε = 2^-23
  and at strength (multiplier) m, for both:
    W'     = W + m · (W_dora − W)

Per input, every input column of W_dora has norm d, whatever ΔW is. The strength scales the whole change,
as A1111's `network.py` (`apply_weight_decompose`, then `* multiplier`) and ComfyUI's `weight_decompose`
(`weight + strength * (weight_calc - weight)`) do. LyCORIS scales only the magnitude's change
(W_dora = (W + ΔW) · (1 + m · (d / ‖W + ΔW‖ − 1))): the same at m = 1, not at other strengths.

Which layout a file has is decided as ComfyUI decides it (`comfy/weight_adapter/base.py`, since its
"Support dora_scale on both axis" of April 2025, read at Comfy-Org/ComfyUI a125cd84, Oct 2025; Forge's
`backend/patcher/lora.py` at dfdcbab6 has the same code): per output channel when d's first dimension is W's
output count. So [1, in] is per input even where out == in, [out, 1] per output even where in == 1, and a
layer with one output channel (no layer a LoRA adapts in SD has one) takes the per-output formula whatever
d's shape, d [1, in] then scaling each element (our training, which makes d per input, would not start at
W' = W on such a layer). A1111 1.10.1's
`network.py` reads only the per-input layout: it broadcasts a per-output d [out, 1] against its per-input
norm [1, in] and so applies such a file wrongly, without an error.

The per-output formula divides by the norm of W, not of W + ΔW: that is ComfyUI's (and Forge's) code, kept
here so a file gives the same weights here, baked, and in ComfyUI or Forge. LyCORIS itself trains and merges
with ‖W + ΔW‖ per output row (`lycoris/modules/locon.py`, `apply_weight_decompose`), so its rows have norm d
exactly, and ComfyUI's rows d · ‖W + ΔW‖ / ‖W‖; a pull request to ComfyUI (Comfy-Org/ComfyUI#15458, open)
would change ComfyUI to LyCORIS' norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lib_training.errors import CheckpointError

# ComfyUI adds ε to the norm (of its fp32 weight) in both layouts; A1111 does not in its per-input one, nor do we
_EPS = torch.finfo(torch.float32).eps


def input_norm(weight: Tensor) -> Tensor:
    """‖W‖ per input channel: [out, in(, kh, kw)] -> [1, in(, 1, 1)], fp32."""
    w = weight.float().transpose(0, 1).flatten(1)  # [in, out·kh·kw]
    return w.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.ndim - 2))


def output_norm(weight: Tensor) -> Tensor:
    """‖W‖ per output channel: [out, in(, kh, kw)] -> [out, 1(, 1, 1)], fp32."""
    w = weight.float().flatten(1)  # [out, in·kh·kw]
    return w.norm(dim=1).reshape(weight.shape[0], *[1] * (weight.ndim - 1))


def on_output_axis(dora_scale: Tensor, weight: Tensor) -> bool:
    """Whether d holds one magnitude per output channel of W: ComfyUI's rule, d's first dimension is W's."""
    return dora_scale.shape[0] == weight.shape[0]


def dora_change(weight: Tensor, delta: Tensor, dora_scale: Tensor, multiplier: float) -> Tensor:
    """W' − W = m · (W_dora − W) in fp32, for W [out, in(, kh, kw)], ΔW of the same shape (fp32) and
    d [1, in(, 1, 1)] (per input) or [out, 1(, 1, 1)] (per output); see the module docstring."""
    start = weight.float()
    merged = start + delta
    if on_output_axis(dora_scale, weight):
        merged = merged * (dora_scale.float() / (output_norm(start) + _EPS))
    else:
        merged = merged * (dora_scale.float() / input_norm(merged))
    return multiplier * (merged - start)


def fitted_dora_scale(dora_scale: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
    """A checked d ([1, in, 1…] or [out, 1, 1…]) with as many dimensions as a weight of `weight_shape`,
    its layout kept."""
    return dora_scale.reshape(int(dora_scale.shape[0]), int(dora_scale.shape[1]), *[1] * (len(weight_shape) - 2))


def checked_dora_scale(path: Path, name: str, dora_scale: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
    """`dora_scale` of module `name` for a weight of `weight_shape` ([out, in(, kh, kw)]), shaped [1, in(, 1, 1)]
    (per input channel) or [out, 1(, 1, 1)] (per output channel); a CheckpointError naming the file, the
    module and both shapes it may have if it fits neither (a file made for another weight, or damaged)."""
    out_features, in_features = int(weight_shape[0]), int(weight_shape[1])
    shape = tuple(int(s) for s in dora_scale.shape)
    ones = [1] * (len(weight_shape) - 2)
    per_input, per_output = [1, in_features, *ones], [out_features, 1, *ones]
    if len(shape) >= 2 and shape[:2] in ((1, in_features), (out_features, 1)) and all(s == 1 for s in shape[2:]):
        return dora_scale.reshape(shape[0], shape[1], *ones)
    raise CheckpointError(
        f"{path.name}: module {name} has a dora_scale of shape {list(shape)}, but for its weight "
        f"{list(weight_shape)} DoRA's magnitude is {per_input} (one value per input channel, as kohya and A1111 "
        f"write it) or {per_output} (one per output channel, LyCORIS' wd_on_out); the file is damaged or was "
        "made for another model"
    )
