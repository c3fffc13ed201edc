"""Merge formulas on small tensors, and the properties of TIES and DARE."""

from __future__ import annotations

import math

import pytest
import torch

from lib_training.merge.methods import (
    MERGE_METHODS,
    KeyContext,
    add_difference,
    clip_to_inputs,
    cosine,
    dare,
    dare_drop,
    key_seed,
    slerp,
    sum_twice,
    ties,
    ties_merge,
    train_difference,
    trim_to_density,
    triple_sum,
    weighted_sum,
)


@pytest.fixture
def abc() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(3))  # type: ignore[return-value]


def test_weighted_sum_is_one_minus_alpha_a_plus_alpha_b(abc) -> None:
    a, b, _ = abc
    assert torch.allclose(weighted_sum(a, b, 0.3), 0.7 * a + 0.3 * b)


def test_add_difference_is_a_plus_alpha_b_minus_c(abc) -> None:
    a, b, c = abc
    assert torch.allclose(add_difference(a, b, c, 0.7), a + 0.7 * (b - c))


def test_triple_sum_weights_a_b_c(abc) -> None:
    a, b, c = abc
    assert torch.allclose(triple_sum(a, b, c, 0.2, 0.3), 0.5 * a + 0.2 * b + 0.3 * c)


def test_sum_twice_blends_a_with_b_then_with_c(abc) -> None:
    a, b, c = abc
    assert torch.allclose(sum_twice(a, b, c, 0.4, 0.25), 0.75 * (0.6 * a + 0.4 * b) + 0.25 * c)


def test_train_difference_adds_b_minus_c_scaled_by_the_distance_of_a_from_b(abc) -> None:
    a, b, c = abc
    expected = a + 1.8 * 0.5 * (b - c) * (b - a).abs() / ((b - a).abs() + (b - c).abs())
    assert torch.allclose(train_difference(a, b, c, 0.5), expected)


def test_train_difference_adds_nothing_where_all_three_agree() -> None:
    same = torch.tensor([1.0, 2.0])
    assert torch.equal(train_difference(same, same, same, 1.0), same)


def test_slerp_keeps_the_endpoints(abc) -> None:
    a, b, _ = abc
    assert torch.allclose(slerp(a, b, 0.0), a)
    assert torch.allclose(slerp(a, b, 1.0), b)


def test_slerp_moves_along_the_great_circle_and_interpolates_the_norm() -> None:
    a = torch.tensor([2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 4.0], dtype=torch.float64)
    result = slerp(a, b, 0.5)
    assert torch.allclose(result / result.norm(), torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    assert result.norm().item() == pytest.approx(3.0)


def test_slerp_of_parallel_tensors_falls_back_to_weighted_sum() -> None:
    a = torch.tensor([1.0, 2.0])
    assert torch.allclose(slerp(a, 3 * a, 0.25), weighted_sum(a, 3 * a, 0.25))


def test_cosine_takes_a_for_identical_directions_and_b_at_alpha_one(abc) -> None:
    a, b, _ = abc
    assert torch.allclose(cosine(a, 2 * a, 0.0), a)
    assert torch.allclose(cosine(a, b, 1.0), b)


def test_cosine_takes_more_of_b_the_less_a_and_b_agree(abc) -> None:
    a, b, _ = abc
    similarity = (a * b).sum() / (a.norm() * b.norm())
    k = 1 - (similarity - 0.1).clamp(0, 1)
    assert torch.allclose(cosine(a, b, 0.1), a + k * (b - a))


def test_weights_clip_clamps_to_the_inputs_range() -> None:
    a, b = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 3.0, -2.0])
    result = clip_to_inputs(torch.tensor([2.0, 2.0, 0.0]), [a, b])
    assert torch.equal(result, torch.tensor([1.0, 2.0, -1.0]))


# --- TIES ------------------------------------------------------------------------------------------


def test_trim_keeps_the_density_fraction_of_largest_magnitudes() -> None:
    delta = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 1.0, 0.05, -2.0, 0.0, 3.0])
    trimmed = trim_to_density(delta, 0.3)
    assert torch.equal(trimmed, torch.tensor([0, -5.0, 0, 4.0, 0, 0, 0, 0, 0, 3.0]))


def test_ties_elects_the_sign_by_total_mass_not_by_count() -> None:
    # two small positive deltas against one large negative one: the mass says negative
    deltas = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    assert torch.equal(ties_merge(deltas, 1.0), torch.tensor([-5.0]))


def test_ties_averages_only_the_deltas_that_agree_with_the_elected_sign() -> None:
    deltas = [torch.tensor([2.0, 3.0, 0.0]), torch.tensor([4.0, -1.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])]
    assert torch.allclose(ties_merge(deltas, 1.0), torch.tensor([3.0, 2.0, 0.0]))


def test_ties_is_c_plus_alpha_times_the_merged_task_vectors(abc) -> None:
    a, b, c = abc
    expected = c + 0.8 * ties_merge([a - c, b - c], 0.5)
    assert torch.allclose(ties(a, b, c, 0.8, 0.5), expected)


def test_ties_at_full_density_with_agreeing_signs_is_the_average() -> None:
    c = torch.zeros(4)
    a, b = torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([3.0, 1.0, -3.0, 0.5])
    assert torch.allclose(ties(a, b, c, 1.0, 1.0), (a + b) / 2)


# --- DARE ------------------------------------------------------------------------------------------


def test_dare_with_the_same_seed_and_key_gives_the_same_result(abc) -> None:
    a, b, c = abc
    first = dare(a, b, c, 1.0, 0.5, torch.Generator().manual_seed(key_seed(7, "k")))
    second = dare(a, b, c, 1.0, 0.5, torch.Generator().manual_seed(key_seed(7, "k")))
    other = dare(a, b, c, 1.0, 0.5, torch.Generator().manual_seed(key_seed(8, "k")))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_key_seeds_differ_between_keys_and_seeds() -> None:
    assert len({key_seed(0, "a"), key_seed(0, "b"), key_seed(1, "a")}) == 3


def test_dare_keeps_about_the_density_fraction_and_rescales_the_kept_entries() -> None:
    delta = torch.full((100_000,), 2.0)
    dropped = dare_drop(delta, 0.3, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(dropped[kept], torch.tensor(2.0 / 0.3))


def test_dare_preserves_the_task_vector_in_expectation() -> None:
    delta = torch.linspace(-1, 1, 50)
    generator = torch.Generator().manual_seed(0)
    mean = torch.stack([dare_drop(delta, 0.5, generator) for _ in range(4000)]).mean(dim=0)
    assert torch.allclose(mean, delta, atol=0.06)


def test_dare_at_full_density_is_the_average_of_a_and_b(abc) -> None:
    a, b, c = abc
    assert torch.allclose(dare(a, b, c, 1.0, 1.0, torch.Generator()), (a + b) / 2)


# --- the registry ----------------------------------------------------------------------------------


def test_registry_applies_each_method_to_the_models_it_names(abc) -> None:
    a, b, c = (t.float() for t in abc)
    context = KeyContext("k", density=0.5, seed=3)
    inputs = {"a": a, "b": b, "c": c}
    expected = {
        "none": a,
        "weighted_sum": weighted_sum(a, b, 0.3),
        "add_difference": add_difference(a, b, c, 0.3),
        "triple_sum": triple_sum(a, b, c, 0.3, 0.2),
        "sum_twice": sum_twice(a, b, c, 0.3, 0.2),
        "slerp": slerp(a, b, 0.3),
        "ties": ties(a, b, c, 0.3, 0.5),
        "dare": dare(a, b, c, 0.3, 0.5, torch.Generator().manual_seed(key_seed(3, "k"))),
        "train_difference": train_difference(a, b, c, 0.3),
        "cosine": cosine(a, b, 0.3),
    }
    assert set(expected) == set(MERGE_METHODS)
    for name, method in MERGE_METHODS.items():
        result = method.apply([inputs[letter] for letter in method.models], 0.3, 0.2, context)
        assert torch.allclose(result, expected[name]), name


def test_methods_that_return_a_at_zero_ratios_say_so(abc) -> None:
    a, b, c = (t.float() for t in abc)
    inputs = {"a": a, "b": b, "c": c}
    for method in MERGE_METHODS.values():
        if method.is_identity(0.0, 0.0):
            result = method.apply([inputs[x] for x in method.models], 0.0, 0.0, KeyContext("k"))
            assert torch.allclose(result, a, atol=1e-6), method.name
