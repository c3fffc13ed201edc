"""Learning-rate schedules: the WebUI's piecewise syntax, the named schedules, and applying them."""

from __future__ import annotations

import pytest
import torch

from lib_training.errors import ConfigError
from lib_training.training.lr_schedule import SCHEDULE_NAMES, parse_schedule, set_learning_rate

# --- WebUI syntax -------------------------------------------------------------------------------


def test_single_number_is_constant_for_every_step() -> None:
    schedule = parse_schedule("0.005", total_steps=50)
    assert {schedule.value_at(step) for step in range(60)} == {0.005}
    assert schedule.end_step is None


def test_a_float_is_accepted_as_well_as_text() -> None:
    assert parse_schedule(1e-4, total_steps=10).value_at(3) == 1e-4


def test_each_value_applies_until_the_step_it_names() -> None:
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", total_steps=2000)
    assert schedule.value_at(0) == 0.005
    assert schedule.value_at(99) == 0.005
    assert schedule.value_at(100) == 1e-3
    assert schedule.value_at(999) == 1e-3
    assert schedule.value_at(1000) == 1e-5
    assert schedule.value_at(1999) == 1e-5
    assert schedule.end_step is None
    assert schedule.last_step == 2000


def test_spaces_are_optional() -> None:
    tight = parse_schedule("0.005:100,1e-3:1000,1e-5", total_steps=2000)
    loose = parse_schedule("  0.005 : 100 ,  1e-3:1000 ,1e-5 ", total_steps=2000)
    assert [tight.value_at(s) for s in (0, 100, 1000)] == [loose.value_at(s) for s in (0, 100, 1000)]


def test_a_last_value_with_a_step_ends_training_at_that_step() -> None:
    schedule = parse_schedule("0.01:100, 0.001:500", total_steps=1000)
    assert schedule.end_step == 500
    assert schedule.last_step == 500
    assert schedule.value_at(499) == 0.001


def test_minus_one_as_the_last_step_runs_to_the_end() -> None:
    schedule = parse_schedule("0.01:100, 0.001:-1", total_steps=1000)
    assert schedule.end_step is None
    assert schedule.value_at(999) == 0.001


def test_entries_past_the_training_length_are_cut_off() -> None:
    schedule = parse_schedule("0.01:100, 0.001:5000, 1e-5", total_steps=1000)
    assert schedule.end_step is None  # the schedule reaches the end of training, so nothing stops early
    assert schedule.value_at(999) == 0.001


def test_a_step_equal_to_the_training_length_does_not_end_early() -> None:
    assert parse_schedule("0.01:1000", total_steps=1000).end_step is None


def test_resuming_reads_the_same_value_for_an_absolute_step() -> None:
    schedule = parse_schedule("0.005:100, 1e-3", total_steps=300)
    assert schedule.value_at(150) == 1e-3  # a run resumed at step 150 continues at the second rate


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("abc", "'abc'"),
        ("0.01:100, x:200", "'x:200'"),
        ("0.01:1e2", "'0.01:1e2'"),
        ("0.01:100,", "'0.01:100,'"),
        ("0.01:100:3", "'0.01:100:3'"),
    ],
)
def test_parse_errors_name_the_bad_part_and_show_the_syntax(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_schedule(text, total_steps=1000)
    assert named in str(error.value)
    assert "0.005:100, 1e-3:1000, 1e-5" in str(error.value)


def test_steps_must_increase() -> None:
    with pytest.raises(ConfigError, match="must increase"):
        parse_schedule("0.01:200, 0.001:100, 1e-5", total_steps=1000)


def test_a_value_without_a_step_must_come_last() -> None:
    with pytest.raises(ConfigError, match="must come last"):
        parse_schedule("0.01, 0.001:100", total_steps=1000)


def test_negative_and_infinite_values_are_refused() -> None:
    for text in ("-0.01", "inf", "nan:100, 0.1"):
        with pytest.raises(ConfigError, match="finite number of 0 or more"):
            parse_schedule(text, total_steps=1000)


def test_empty_text_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        parse_schedule("  ", total_steps=10)


def test_error_messages_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="gradient clipping limit"):
        parse_schedule("x", total_steps=10, what="gradient clipping limit")


def test_clip_schedule_holds_its_last_value_after_its_end_step() -> None:
    schedule = parse_schedule("0.1:10, 0.05:20", total_steps=100, what="gradient clipping limit")
    assert schedule.value_at(50) == 0.05


# --- named schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_named_schedules_match_diffusers(name: str) -> None:
    from diffusers.optimization import get_scheduler

    total, warmup, cycles, base = 40, 7, 3, 0.01
    schedule = parse_schedule(base, total_steps=total, name=name, warmup_steps=warmup, cycles=cycles)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    reference = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles)
    for step in range(total + 1):
        assert schedule.value_at(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        optimizer.step()
        reference.step()


def test_linear_reaches_zero_at_the_last_step() -> None:
    schedule = parse_schedule(0.1, total_steps=10, name="linear", warmup_steps=2)
    assert schedule.value_at(2) == pytest.approx(0.1)
    assert schedule.value_at(10) == 0.0


def test_named_schedule_refuses_a_list_of_values() -> None:
    with pytest.raises(ConfigError, match="single number"):
        parse_schedule("0.01:100, 0.001", total_steps=1000, name="cosine")


def test_unknown_schedule_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="cosine_with_restarts"):
        parse_schedule(0.1, total_steps=10, name="exponential")


def test_warmup_longer_than_training_is_refused() -> None:
    with pytest.raises(ConfigError, match="warmup"):
        parse_schedule(0.1, total_steps=10, name="linear", warmup_steps=11)


def test_total_steps_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        parse_schedule(0.1, total_steps=0)


# --- applying ---------------------------------------------------------------------------------------


def test_set_learning_rate_sets_every_group_and_honours_lr_scale() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    schedule = parse_schedule("0.01:5, 0.002", total_steps=10)
    assert set_learning_rate(optimizer, schedule, 7) == 0.002
    assert optimizer.param_groups[0]["lr"] == 0.002
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.0002)


def test_set_learning_rate_fills_a_tensor_lr_in_place() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([p], lr=torch.tensor(1.0))
    lr = optimizer.param_groups[0]["lr"]
    set_learning_rate(optimizer, parse_schedule(0.25, total_steps=3), 0)
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == 0.25
