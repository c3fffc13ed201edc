"""Seeds derived from named parts, so every random choice can be recomputed from where it was made.

The global random generators are never used: a choice made for (seed, epoch, item) gets a generator
of its own, seeded from a hash of those parts, so a resumed run draws exactly what an uninterrupted
run would have drawn, whatever happened before.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from `parts` (ints or strings), stable across processes and Python versions."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def rng_for(*parts: object) -> random.Random:
    """A private `random.Random` seeded from `parts`."""
    return random.Random(derive_seed(*parts))
