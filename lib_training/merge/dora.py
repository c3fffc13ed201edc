"""DoRA's weight as A1111 and ComfyUI compute it from a kohya file's `dora_scale`: one formula for the hook
that applies a LoRA (`methods/lora/network.py`) and for the merge tools that bake or resize one.

For a weight W [out, in(, kh, kw)], the LoRA's update ΔW = (alpha / rank) · up @ down (same shape) and the
magnitude d = `dora_scale` [1, in(, 1, 1)], one value per input channel:

    W_dora = d ⊙ (W + ΔW) / ‖W + ΔW‖          ‖·‖ per input channel: over the output rows and the kernel
    W'     = W + m · (W_dora − W)             at strength (multiplier) m

So every input column of W_dora has norm d, whatever ΔW is; the strength scales the whole change, as
A1111's `network.py` (`apply_weight_decompose`, then `* multiplier`) and ComfyUI's `weight_decompose`
(`weight + strength * (weight_calc - weight)`) do. LyCORIS scales only the magnitude's change
(W_dora = (W + ΔW) · (1 + m · (d / ‖W + ΔW‖ − 1))): the same at m = 1, not at other strengths.

LyCORIS can also write the magnitude per output channel (`wd_on_out`, d [out, 1(, 1, 1)]); A1111 reads
only the per-input layout, so such files are refused here with a message rather than misread.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lib_training.errors import CheckpointError


def input_norm(weight: Tensor) -> Tensor:
    """‖W‖ per input channel: [out, in(, kh, kw)] -> [1, in(, 1, 1)], fp32."""
    w = weight.float().transpose(0, 1).flatten(1)  # [in, out·kh·kw]
    return w.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.ndim - 2))


def dora_change(weight: Tensor, delta: Tensor, dora_scale: Tensor, multiplier: float) -> Tensor:
    """W' − W = m · (W_dora − W) in fp32, for W [out, in(, kh, kw)], ΔW of the same shape (fp32) and
    d [1, in(, 1, 1)]."""
    start = weight.float()
    merged = start + delta
    merged = merged * (dora_scale.float() / input_norm(merged))
    return multiplier * (merged - start)


def checked_dora_scale(path: Path, name: str, dora_scale: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
    """`dora_scale` of module `name` shaped [1, in(, 1, 1)] for a weight of `weight_shape`
    ([out, in(, kh, kw)]); a CheckpointError naming the file, the module and the expected shape if it does
    not fit (a per-output magnitude, or a file made for another weight)."""
    out_features, in_features = int(weight_shape[0]), int(weight_shape[1])
    shape = tuple(int(s) for s in dora_scale.shape)
    expected = (1, in_features, *[1] * (len(weight_shape) - 2))
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == in_features and all(s == 1 for s in shape[2:]):
        return dora_scale.reshape(expected)
    if shape and shape[0] == out_features and out_features != 1 and all(s == 1 for s in shape[1:]):
        raise CheckpointError(
            f"{path.name}: module {name} has a dora_scale of shape {list(shape)}, a magnitude per output channel "
            f"(LyCORIS' wd_on_out); A1111 and this tool read DoRA's magnitude per input channel, "
            f"{list(expected)}. Retrain with wd_on_out=False, or apply the file in ComfyUI"
        )
    raise CheckpointError(
        f"{path.name}: module {name} has a dora_scale of shape {list(shape)}, but for its weight "
        f"{list(weight_shape)} DoRA's magnitude is {list(expected)} (one value per input channel); the file is "
        "damaged or was made for another model"
    )
