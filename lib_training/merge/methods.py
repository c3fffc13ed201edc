"""Merge formulas: each a small pure function of fp32 tensors of one key.

A, B, C are the three input models' tensors, alpha and beta the ratios for this key. Where popular
tools differ, the choice made is stated; the formulas are written from their definitions.

| name             | models  | result                                                            |
|------------------|---------|-------------------------------------------------------------------|
| none             | A       | A (convert, prune, bake a VAE)                                    |
| weighted_sum     | A B     | (1 - alpha)·A + alpha·B          (A1111, supermerger, sd-meh)     |
| add_difference   | A B C   | A + alpha·(B - C)                (A1111, supermerger, sd-meh)     |
| triple_sum       | A B C   | (1 - alpha - beta)·A + alpha·B + beta·C      (supermerger, sd-meh) |
| sum_twice        | A B C   | (1 - beta)·((1 - alpha)·A + alpha·B) + beta·C (supermerger, sd-meh)|
| slerp            | A B     | spherical interpolation of A towards B by alpha, per tensor       |
| ties             | A B C   | C + alpha·TIES(A - C, B - C; density)                             |
| dare             | A B C   | C + alpha·mean(DARE(A - C), DARE(B - C); density, seed)           |
| train_difference | A B C   | A + 1.8·alpha·(B - C)·|B - A| / (|B - A| + |B - C|)  (supermerger) |
| cosine           | A B     | A + k·(B - A), k = 1 - clamp(cos(A, B) - alpha, 0, 1), per tensor  |

- SLERP interpolates the directions of A and B (as flat vectors) along the great circle and the
  norms linearly: |result| = (1 - alpha)·|A| + alpha·|B| (as sd-mecha does); nearly parallel or
  zero tensors fall back to weighted sum.
- TIES (Yadav et al. 2023, "Resolving interference when merging models"): each task vector
  (A - C, B - C) keeps only its `density` fraction of largest-magnitude entries; per element the
  sign with the larger total mass (sign of the sum of the trimmed values) is elected; the result
  is the mean of the trimmed values that agree with it ("disjoint mean"). sd-meh's
  ties_add_difference elects by counting signs instead; the paper elects by mass, as here.
- DARE (Yu et al. 2023, "Language models are Super Mario"): each task vector keeps each entry
  with probability `density` and divides the kept ones by `density`, so its expectation is
  unchanged. The random mask is seeded by `seed` and the key, so a merge is reproducible whatever
  the order of keys or the device.
- With density 1 and alpha 1, ties and dare both give the average of A and B.
- cosine: A's tensors are kept where A and B point the same way and B's taken where they diverge;
  alpha shifts the whole model towards B (alpha 1 gives B). This is sd-mecha's add_cosine_a with
  the similarity of the whole tensor; supermerger's cosineA also rescales similarities by their
  spread over the whole model, which needs a second pass over both files.
- weights clip (option): the result is clamped per element to the range of the inputs the method
  uses (A, B and, where it uses one, C). sd-meh clamps to A and B only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# --- two and three model blends ----------------------------------------------------------------


def weighted_sum(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """(1 - alpha)·A + alpha·B, computed as A + alpha·(B - A)."""
    return torch.lerp(a, b, alpha)


def add_difference(a: Tensor, b: Tensor, c: Tensor, alpha: float) -> Tensor:
    """A + alpha·(B - C)."""
    return a + alpha * (b - c)


def triple_sum(a: Tensor, b: Tensor, c: Tensor, alpha: float, beta: float) -> Tensor:
    """(1 - alpha - beta)·A + alpha·B + beta·C."""
    return (1 - alpha - beta) * a + alpha * b + beta * c


def sum_twice(a: Tensor, b: Tensor, c: Tensor, alpha: float, beta: float) -> Tensor:
    """(1 - beta)·((1 - alpha)·A + alpha·B) + beta·C."""
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)


def train_difference(a: Tensor, b: Tensor, c: Tensor, alpha: float) -> Tensor:
    """A + 1.8·alpha·(B - C)·|B - A| / (|B - A| + |B - C|), the fraction being 0 where B = A = C.

    B's training (B - C) is added to A in proportion to how far A is from B: where A already has
    B's value nothing is added.
    """
    to_a = (b - a).abs()
    total = to_a + (b - c).abs()
    scale = torch.where(total > 0, to_a / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    return a + (1.8 * alpha) * scale * (b - c)


def slerp(a: Tensor, b: Tensor, alpha: float, eps: float = 1e-6) -> Tensor:
    """Spherical interpolation of the directions of A and B, linear interpolation of their norms."""
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a <= 0 or norm_b <= 0:
        return torch.lerp(a, b, alpha)
    unit_a, unit_b = a / norm_a, b / norm_b
    cos = (unit_a * unit_b).sum().clamp(-1.0, 1.0)
    if 1 - cos.abs() < eps:
        return torch.lerp(a, b, alpha)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    direction = (torch.sin((1 - alpha) * omega) / sin) * unit_a + (torch.sin(alpha * omega) / sin) * unit_b
    return direction * torch.lerp(norm_a, norm_b, alpha)


def cosine(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """A + k·(B - A) with k = 1 - clamp(cos(A, B) - alpha, 0, 1), cos over the whole tensor."""
    norms = a.norm() * b.norm()
    similarity = (a * b).sum() / norms if norms > 0 else torch.ones((), device=a.device)
    k = 1 - (similarity - alpha).clamp(0.0, 1.0)
    return torch.lerp(a, b, k)


# --- task-vector merges ----------------------------------------------------------------------------


def trim_to_density(delta: Tensor, density: float) -> Tensor:
    """Keep the `density` fraction of entries with the largest magnitude, zero the rest.

    Entries tied with the smallest kept magnitude are kept too.
    """
    count = delta.numel()
    if density >= 1 or count == 0:
        return delta
    keep = max(1, math.ceil(density * count))
    threshold = delta.abs().flatten().kthvalue(count - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, 0.0)


def ties_merge(deltas: Sequence[Tensor], density: float) -> Tensor:
    """TIES: trim each delta, elect each element's sign by total mass, average the agreeing entries."""
    trimmed = torch.stack([trim_to_density(delta, density) for delta in deltas])  # [N, ...]
    elected = torch.sign(trimmed.sum(dim=0))  # sign of the total mass per element
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agrees.sum(dim=0)
    total = torch.where(agrees, trimmed, 0.0).sum(dim=0)
    return torch.where(count > 0, total / count.clamp_min(1), 0.0)


def ties(a: Tensor, b: Tensor, c: Tensor, alpha: float, density: float) -> Tensor:
    """C + alpha·TIES(A - C, B - C)."""
    return c + alpha * ties_merge([a - c, b - c], density)


def key_seed(seed: int, key: str) -> int:
    """A seed for one key's random numbers, the same whatever order keys are merged in."""
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode("utf-8"))) % (2**63)


def dare_drop(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with probability `density` and divide the kept ones by it (random on the CPU)."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep.to(delta.device), delta / density, 0.0)


def dare(a: Tensor, b: Tensor, c: Tensor, alpha: float, density: float, generator: torch.Generator) -> Tensor:
    """C + alpha·(DARE(A - C) + DARE(B - C)) / 2."""
    merged = (dare_drop(a - c, density, generator) + dare_drop(b - c, density, generator)) / 2
    return c + alpha * merged


def clip_to_inputs(result: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """Clamp each element of `result` to the range of the same element over `inputs`."""
    low = high = inputs[0]
    for tensor in inputs[1:]:
        low, high = torch.minimum(low, tensor), torch.maximum(high, tensor)
    return torch.minimum(torch.maximum(result, low), high)


# --- the registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyContext:
    """What a method may need beyond the tensors and ratios of one key."""

    key: str
    density: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class MergeMethod:
    name: str
    models: str  # the models it reads: "a", "ab" or "abc"
    formula: str  # one line, for help texts
    uses_beta: bool
    elementwise: bool  # each output element depends on the same element of the inputs only
    apply: Callable[[Sequence[Tensor], float, float, KeyContext], Tensor]
    identity_at_zero: bool  # alpha = beta = 0 returns A exactly (so A can be copied without reading B, C)

    def is_identity(self, alpha: float, beta: float) -> bool:
        return self.name == "none" or (self.identity_at_zero and alpha == 0 and (beta == 0 or not self.uses_beta))


def _dare(t: Sequence[Tensor], alpha: float, beta: float, ctx: KeyContext) -> Tensor:
    generator = torch.Generator().manual_seed(key_seed(ctx.seed, ctx.key))
    return dare(t[0], t[1], t[2], alpha, ctx.density, generator)


def _method(
    name: str,
    models: str,
    formula: str,
    apply: Callable[[Sequence[Tensor], float, float, KeyContext], Tensor],
    *,
    uses_beta: bool = False,
    elementwise: bool = True,
    identity_at_zero: bool = True,
) -> MergeMethod:
    return MergeMethod(name, models, formula, uses_beta, elementwise, apply, identity_at_zero)


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        _method("none", "a", "A", lambda t, al, be, ctx: t[0]),
        _method(
            "weighted_sum",
            "ab",
            "(1 - alpha)·A + alpha·B",
            lambda t, al, be, ctx: weighted_sum(t[0], t[1], al),
        ),
        _method(
            "add_difference",
            "abc",
            "A + alpha·(B - C)",
            lambda t, al, be, ctx: add_difference(t[0], t[1], t[2], al),
        ),
        _method(
            "triple_sum",
            "abc",
            "(1 - alpha - beta)·A + alpha·B + beta·C",
            lambda t, al, be, ctx: triple_sum(t[0], t[1], t[2], al, be),
            uses_beta=True,
        ),
        _method(
            "sum_twice",
            "abc",
            "(1 - beta)·((1 - alpha)·A + alpha·B) + beta·C",
            lambda t, al, be, ctx: sum_twice(t[0], t[1], t[2], al, be),
            uses_beta=True,
        ),
        _method(
            "slerp",
            "ab",
            "spherical interpolation from A (alpha 0) to B (alpha 1), per tensor",
            lambda t, al, be, ctx: slerp(t[0], t[1], al),
            elementwise=False,
        ),
        _method(
            "ties",
            "abc",
            "C + alpha·TIES(A - C, B - C): trim to density, elect signs by mass, disjoint mean",
            lambda t, al, be, ctx: ties(t[0], t[1], t[2], al, ctx.density),
            elementwise=False,
            identity_at_zero=False,
        ),
        _method(
            "dare",
            "abc",
            "C + alpha·mean(DARE(A - C), DARE(B - C)): random drop to density, rescale",
            _dare,
            elementwise=False,
            identity_at_zero=False,
        ),
        _method(
            "train_difference",
            "abc",
            "A + 1.8·alpha·(B - C)·|B - A| / (|B - A| + |B - C|)",
            lambda t, al, be, ctx: train_difference(t[0], t[1], t[2], al),
        ),
        _method(
            "cosine",
            "ab",
            "A + k·(B - A), k = 1 - clamp(cos(A, B) - alpha, 0, 1), per tensor",
            lambda t, al, be, ctx: cosine(t[0], t[1], al),
            elementwise=False,
            identity_at_zero=False,
        ),
    )
}
