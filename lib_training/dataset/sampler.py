"""The order in which training items are batched: seeded per epoch, grouped by resolution, resumable.

Items are grouped by training resolution (one group without buckets). Each epoch, every group is
shuffled and cut into batches, then the batches of all groups are shuffled together, all with a
generator seeded from (seed, epoch). So an epoch's batches depend only on the seed, the epoch and
the grouping, and a sampler restored from `state_dict()` continues with exactly the batches an
uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lib_training.dataset.errors import DatasetError
from lib_training.errors import ConfigError
from lib_training.seeding import rng_for


@dataclass(frozen=True)
class BatchPlan:
    """Which dataset items make one batch, and where the batch is in the run."""

    epoch: int
    position: int  # index of this batch within its epoch
    items: tuple[int, ...]  # dataset item indices, all of the same training resolution


class BatchSampler:
    """An endless, resumable iterator of `BatchPlan`s over groups of same-resolution items.

    Iterating advances the state: after a batch is returned, `state_dict()` points at the next one.
    Batches are `batch_size` long except the last of each group per epoch, which may be shorter
    unless `drop_last` is set.
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1:
            raise ConfigError(f"The batch size must be at least 1 (got {batch_size}).")
        self.groups = [tuple(group) for group in groups if group]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._plan_epoch = -1
        self._plan: list[tuple[int, ...]] = []
        if len(self) == 0:
            largest = max((len(group) for group in self.groups), default=0)
            raise ConfigError(
                f"No full batch of {batch_size} fits in any resolution group (the largest has {largest} "
                "samples). Lower the batch size, add repeats, or keep incomplete batches."
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return sum(len(group) // self.batch_size for group in self.groups)
        return sum(-(-len(group) // self.batch_size) for group in self.groups)

    @property
    def layout(self) -> str:
        """A short fingerprint of the grouping, batch size and settings: a resumed run must match it."""
        text = json.dumps([self.groups, self.batch_size, self.drop_last])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def epoch_plan(self, epoch: int) -> list[tuple[int, ...]]:
        """The batches of `epoch`, in order."""
        if epoch != self._plan_epoch:
            rng = rng_for(self.seed, "batch-order", epoch)
            batches: list[tuple[int, ...]] = []
            for group in self.groups:
                items = list(group)
                rng.shuffle(items)
                for start in range(0, len(items), self.batch_size):
                    batch = tuple(items[start : start + self.batch_size])
                    if len(batch) == self.batch_size or not self.drop_last:
                        batches.append(batch)
            rng.shuffle(batches)
            self._plan_epoch, self._plan = epoch, batches
        return self._plan

    def __iter__(self) -> Iterator[BatchPlan]:
        return self

    def __next__(self) -> BatchPlan:
        plan = self.epoch_plan(self.epoch)
        result = BatchPlan(self.epoch, self.position, plan[self.position])
        self.position += 1
        if self.position == len(plan):
            self.epoch, self.position = self.epoch + 1, 0
        return result

    def state_dict(self) -> dict[str, int | str]:
        """Where the sampler is (the next batch), with what it needs to check a resume."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "layout": self.layout,
        }

    def load_state_dict(self, state: dict[str, int | str], strict: bool = True) -> None:
        """Continue from a saved state.

        With `strict` the seed, batch size and item grouping must be those of the saved run, or the
        batches would differ from an uninterrupted run; `strict=False` takes only epoch and position.
        """
        if strict:
            changed = [
                f"{key} {state.get(key)!r} -> {current!r}"
                for key, current in (
                    ("seed", self.seed),
                    ("batch_size", self.batch_size),
                    ("layout", self.layout),
                )
                if state.get(key) != current
            ]
            if changed:
                raise DatasetError(
                    "Cannot resume the batch order exactly: the dataset or batch settings changed since it "
                    f"was saved ({'; '.join(changed)}). Restore them, or resume without exact order."
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= len(self):
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
