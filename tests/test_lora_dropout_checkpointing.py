"""LoRA dropout (neuron, rank, module) together with gradient checkpointing: the recomputed forward draws the
first forward's masks, so gradients, the dropout generator and resumed runs are as without checkpointing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lora_support import FAST, data, make_red_balls, randomise, small_lora

import lib_training.model.checkpointing as checkpointing
from lib_training.formats.tensor_files import open_tensors
from lib_training.model.standalone import load_model
from lib_training.training.run import train

DROPOUT = {"dropout": 0.3, "rank_dropout": 0.3, "module_dropout": 0.2, "train_text_encoder": True, "locon": True}


@pytest.fixture(scope="module")
def red_ball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_red_balls(tmp_path_factory.mktemp("red-ball"))


def one_step(model, method, checkpointed: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The LoRA's gradients of one forward and backward (text encoder and UNet, dropout on), and the
    dropout generator's state after it."""
    network = method.network
    for parameter in network.parameters():
        parameter.grad = None
    model.set_gradient_checkpointing(checkpointed)
    try:
        generator = torch.Generator().manual_seed(5)
        x_t = torch.randn(2, 4, 8, 8, generator=generator)
        cond = model.encode_prompts(["a red ball", "a blue cube on a table"])
        model.predict(x_t, torch.tensor([100, 700]), cond).square().mean().backward()
    finally:
        model.set_gradient_checkpointing(False)
    grads = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
    return grads, network.rng.get_state()


@pytest.fixture
def sd1_with_dropout(tiny_checkpoints):
    model = load_model(tiny_checkpoints["sd1"])
    method = small_lora(**DROPOUT)
    method.attach(model)
    randomise(method)
    yield model, method
    method.detach()


@pytest.mark.parametrize(
    ("arch", "settings"),
    [("sd1", DROPOUT), ("sd2", {**DROPOUT, "dora": True})],  # SD2: open_clip's fused attention; DoRA layers
)
def test_gradients_with_dropout_and_checkpointing_equal_those_without(arch, settings, tiny_checkpoints) -> None:
    model = load_model(tiny_checkpoints[arch])
    method = small_lora(**settings)
    method.attach(model)
    randomise(method)
    start = method.network.rng.get_state()
    expected, expected_state = one_step(model, method, checkpointed=False)
    method.network.rng.set_state(start)
    found, state = one_step(model, method, checkpointed=True)
    assert found.keys() == expected.keys() and len(found) > 100
    for name, grad in expected.items():
        assert torch.equal(found[name], grad), name
    assert torch.equal(state, expected_state)  # the generator ends where it would without checkpointing
    method.detach()


def test_without_replaying_the_generator_checkpointing_would_change_the_gradients(
    sd1_with_dropout, monkeypatch
) -> None:
    """The control: torch's own checkpointing alone recomputes with other masks (and, where a skipped module
    changes which tensors the recomputation saves, torch stops the backward)."""
    model, method = sd1_with_dropout
    start = method.network.rng.get_state()
    expected, _ = one_step(model, method, checkpointed=False)
    method.network.rng.set_state(start)
    monkeypatch.setattr(checkpointing, "_GENERATORS", [])  # nothing registered: nothing replayed
    try:
        found, _ = one_step(model, method, checkpointed=True)
    except torch.utils.checkpoint.CheckpointError:
        return
    assert any(not torch.allclose(found[name], grad, rtol=1e-3, atol=1e-6) for name, grad in expected.items())


def test_the_generator_is_replayed_only_while_the_network_is_attached(tiny_checkpoints) -> None:
    model = load_model(tiny_checkpoints["sd1"])
    method = small_lora(**DROPOUT)
    method.attach(model)
    assert any(g is method.network.rng for g in checkpointing._GENERATORS)
    method.detach()
    assert not any(g is method.network.rng for g in checkpointing._GENERATORS)
    plain = small_lora()
    plain.attach(model)
    assert not any(g is plain.network.rng for g in checkpointing._GENERATORS)  # no dropout, nothing to replay
    plain.detach()


def test_training_with_dropout_and_checkpointing_equals_training_without(tiny_sd1, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=4, batch_size=2)
    without = train(tiny_sd1, small_lora(**DROPOUT), data(red_ball), loop, tmp_path / "a")
    checkpointed = dataclasses.replace(loop, gradient_checkpointing=True)
    found = train(tiny_sd1, small_lora(**DROPOUT), data(red_ball), checkpointed, tmp_path / "b")
    with open_tensors(without.result) as a, open_tensors(found.result) as b:
        assert a.keys() == b.keys()
        for key in a.keys():  # noqa: SIM118  (a tensor source, not a dict)
            assert torch.equal(b.get(key), a.get(key)), key


def test_resume_with_dropout_and_checkpointing_is_bit_identical(tiny_sd1, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=6, batch_size=2, gradient_checkpointing=True)
    straight = train(tiny_sd1, small_lora(**DROPOUT), data(red_ball), loop, tmp_path / "a")
    calls = iter(range(100))
    stop = lambda: next(calls) >= 3  # noqa: E731  (checked before each step: stops after 3)
    first = train(tiny_sd1, small_lora(**DROPOUT), data(red_ball), loop, tmp_path / "b", should_stop=stop)
    assert first.interrupted and first.step == 3
    resumed = train(tiny_sd1, small_lora(**DROPOUT), data(red_ball), loop, tmp_path / "b", resume=True)
    assert resumed.step == 6 and not resumed.interrupted
    with open_tensors(straight.result) as a, open_tensors(resumed.result) as b:
        assert a.keys() == b.keys()
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())  # noqa: SIM118
