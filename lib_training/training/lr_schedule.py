"""Learning-rate and gradient-clipping schedules: the WebUI's piecewise syntax and named schedules.

Steps count from 0: `value_at(k)` is the value for the optimizer step taken when k steps are done,
so the first step uses `value_at(0)`. This is the convention of the WebUI (its step counter is the
number of steps taken so far) and of the usual named schedules, whose warmup therefore starts the
first step at 0.

WebUI syntax: `"0.005:100, 1e-3:1000, 1e-5"` is 0.005 for steps 0-99, 1e-3 for steps 100-999 and
1e-5 from step 1000 to the end; a single number is constant; spaces are optional. A `value:step`
pair ends at that step, so when the *last* entry is such a pair the schedule ends there and
training stops after that many steps (`end_step`), as in the WebUI; `value:-1` runs to the end.
Entries past the training length are cut off. The same syntax serves the gradient-clipping limit,
where `end_step` is ignored and the last value holds to the end.

Named schedules scale one base value by a factor in [0, 1] (W warmup steps, T total steps,
s the step): warmup is s / W for s < W; after it `constant_with_warmup` stays at 1, `linear` falls
as (T - s) / (T - W) to 0 at step T, `cosine` follows half a cosine from 1 to 0 over the same span,
and `cosine_with_restarts` runs that half cosine `cycles` times, starting again at 1 each time.
`constant` ignores the warmup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from lib_training.errors import ConfigError

SCHEDULE_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
SYNTAX = 'a number like "0.005", or values with the step each one ends at, like "0.005:100, 1e-3:1000, 1e-5"'
OPEN_END = -1  # `value:-1`: the value holds to the end of training


@dataclass(frozen=True)
class StepSchedule:
    """A value per optimizer step (a learning rate, or a gradient-clipping limit).

    `pieces` are (value, until) pairs with increasing `until`: the value applies to the steps
    before `until` that no earlier piece covers; past the last piece its value holds. `end_step` is
    the step count at which the schedule ends training early (from a last `value:step` entry), or
    None when training runs all `total_steps`.
    """

    pieces: tuple[tuple[float, int], ...]
    total_steps: int
    end_step: int | None = None
    name: str = "constant"
    warmup_steps: int = 0
    cycles: int = 1

    def base_at(self, step: int) -> float:
        """The piecewise value at `step`, before a named schedule's factor."""
        for value, until in self.pieces:
            if step < until:
                return value
        return self.pieces[-1][0]

    def factor_at(self, step: int) -> float:
        """The named schedule's factor in [0, 1] at `step` (1 for `constant`)."""
        warmup, total = self.warmup_steps, self.total_steps
        if self.name == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if self.name == "constant_with_warmup":
            return 1.0
        if self.name == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay
        if self.name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if progress >= 1.0:  # cosine_with_restarts
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1.0))))

    def value_at(self, step: int) -> float:
        """The value for the optimizer step taken when `step` steps are done (0 for the first)."""
        return self.base_at(step) * self.factor_at(step)

    @property
    def last_step(self) -> int:
        """How many steps training takes: `end_step`, or `total_steps` when there is none."""
        return self.total_steps if self.end_step is None else self.end_step


def parse_schedule(
    spec: str | float,
    *,
    total_steps: int,
    name: str = "constant",
    warmup_steps: int = 0,
    cycles: int = 1,
    what: str = "learning rate",
) -> StepSchedule:
    """Build a schedule from a number or WebUI schedule text, shaped by a named schedule.

    `what` names the setting in error messages ("learning rate", "gradient clipping limit").
    Named schedules other than `constant` take a single base value. Raises ConfigError for text
    that does not parse, naming the bad part and showing the expected syntax.
    """
    name = name.strip().lower()
    if name not in SCHEDULE_NAMES:
        raise ConfigError(f"unknown {what} schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"the number of training steps must be a whole number of at least 1 (got {total_steps})")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ConfigError(
            f"warmup steps must be a whole number from 0 to the number of training steps ({total_steps}), "
            f"got {warmup_steps}"
        )
    if name == "cosine_with_restarts" and (not isinstance(cycles, int) or cycles < 1):
        raise ConfigError(f"cosine with restarts needs a whole number of cycles of at least 1 (got {cycles})")

    if isinstance(spec, str):
        pieces, end_step = _parse_text(spec, total_steps, what)
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        pieces, end_step = ((_check_value(float(spec), str(spec), what), total_steps),), None
    else:
        raise ConfigError(f"the {what} must be {SYNTAX}; got {spec!r}")
    if name != "constant" and len(pieces) > 1:
        raise ConfigError(
            f"the {name} schedule scales one base {what}; give a single number instead of {spec!r}, or "
            "choose the constant schedule to use a list of values with steps"
        )
    return StepSchedule(pieces, total_steps, end_step, name, warmup_steps, cycles)


def _parse_text(text: str, total_steps: int, what: str) -> tuple[tuple[tuple[float, int], ...], int | None]:
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        raise ConfigError(f"the {what} is empty; expected {SYNTAX}")
    pieces: list[tuple[float, int]] = []
    previous = 0
    for index, part in enumerate(parts):
        if not part:
            raise ConfigError(f"the {what} {text!r} has an empty entry (a stray comma?); expected {SYNTAX}")
        value_text, colon, step_text = part.partition(":")
        value = _check_value(_parse_number(value_text, part, what), part, what)
        is_last = index == len(parts) - 1
        if not colon:
            if not is_last:
                raise ConfigError(
                    f"in the {what} {text!r}, {part!r} has no end step, so it must come last; expected {SYNTAX}"
                )
            pieces.append((value, total_steps))
            return tuple(pieces), None
        step = _parse_step(step_text, part, what)
        if step == OPEN_END:
            if not is_last:
                raise ConfigError(f"in the {what} {text!r}, {part!r} runs to the end of training, so it must come last")
            pieces.append((value, total_steps))
            return tuple(pieces), None
        if step <= previous:
            raise ConfigError(
                f"in the {what} {text!r}, the steps must increase: {part!r} ends at step {step}, "
                f"not after the step before it ({previous})"
            )
        previous = step
        if step >= total_steps:  # reaches the end of training: later entries never apply
            pieces.append((value, total_steps))
            return tuple(pieces), None
        pieces.append((value, step))
    return tuple(pieces), previous  # the last entry had an end step before the end: stop there


def _parse_number(text: str, part: str, what: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{part!r} in the {what} is not a number; expected {SYNTAX}") from None


def _check_value(value: float, part: str, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{part!r} in the {what}: the value must be a finite number of 0 or more")
    return value


def _parse_step(text: str, part: str, what: str) -> int:
    text = text.strip()
    if text == str(OPEN_END):
        return OPEN_END
    if not text.isdigit():
        raise ConfigError(
            f"{part!r} in the {what}: the step after ':' must be a whole number (or -1 for the end of "
            f"training); expected {SYNTAX}"
        )
    step = int(text)
    if step == 0:
        raise ConfigError(f"{part!r} in the {what}: a value that ends at step 0 never applies; use a step of 1 or more")
    return step


def set_learning_rate(optimizer: Optimizer, schedule: StepSchedule | Sequence[StepSchedule], step: int) -> float:
    """Set every param group's lr for the optimizer step taken when `step` steps are done.

    `schedule` is one schedule for every group, or one per group (a method's groups may each have
    their own learning rate). A group may carry an "lr_scale" entry (a float, default 1) to train at a multiple of the
    schedule, e.g. a text encoder at a tenth of the UNet's rate. For Prodigy the lr is a multiplier
    on the step size it estimates itself, so its schedules use a base of 1.0 and the named shapes
    (warmup, decay) scale that. Returns the (first) schedule's value at `step`.
    """
    schedules = [schedule] * len(optimizer.param_groups) if isinstance(schedule, StepSchedule) else list(schedule)
    if len(schedules) != len(optimizer.param_groups):
        raise ValueError(f"{len(schedules)} schedules for {len(optimizer.param_groups)} parameter groups")
    for group, own in zip(optimizer.param_groups, schedules):
        lr = own.value_at(step) * float(group.get("lr_scale", 1.0))
        if isinstance(group["lr"], torch.Tensor):  # optimizers built with a tensor lr keep it a tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return schedules[0].value_at(step)
