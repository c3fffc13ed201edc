"""Hypernetworks at generation, computed as cheaply as the formula allows: the text context's inputs
once and reused (the same numbers as computing them afresh, never kept past what they were computed
for: another prompt, changed weights, training, the end of the application), and an affine module
as one matrix (the formula's numbers to float rounding)."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch

from lib_training.methods import hypernetwork_attach
from lib_training.methods.hypernetwork import HypernetworkConfig, HypernetworkMethod
from lib_training.methods.hypernetwork_attach import _Computed
from lib_training.methods.hypernetwork_net import HypernetworkModule, Structure, affine_form


def _made(model, activation: str) -> HypernetworkMethod:
    """A hypernetwork on the tiny SD1's context (128) and feature widths, with weights large enough to matter."""
    made = HypernetworkMethod(HypernetworkConfig(name="hn", activation=activation))
    with made.attached(model):
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in made.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return made


@pytest.fixture()
def method(tiny_sd1) -> HypernetworkMethod:
    return _made(tiny_sd1, "relu")


def _inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([100, 700])


def _uncached(monkeypatch):
    """Every UNet call computes the context's inputs afresh."""
    monkeypatch.setattr(_Computed, "reusable_for", lambda *_: False)


def _context_calls(method: HypernetworkMethod) -> list[int]:
    calls: list[int] = []
    method.modules[128][0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    return calls


def test_generation_runs_the_context_modules_once_for_all_steps_with_the_same_result(
    tiny_sd1, method, monkeypatch
) -> None:
    cond = tiny_sd1.encode_prompts(["a red ball", ""])
    steps = [_inputs(seed) for seed in range(3)]

    def sample() -> list[torch.Tensor]:
        with torch.no_grad(), method.apply_for_generation(tiny_sd1):
            return [tiny_sd1.predict(x, t, cond) for x, t in steps]

    calls = _context_calls(method)
    cached = sample()
    context_runs = calls.count(cond.context.shape[1])
    _uncached(monkeypatch)
    calls.clear()
    uncached = sample()
    assert context_runs == 1 and calls.count(cond.context.shape[1]) == len(steps)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))


def test_a_new_prompt_a_changed_context_or_changed_weights_are_computed_afresh(tiny_sd1, method, monkeypatch) -> None:
    x, t = _inputs(0)
    red, blue = tiny_sd1.encode_prompts(["a red ball"] * 2), tiny_sd1.encode_prompts(["a blue cube"] * 2)

    def run() -> list[torch.Tensor]:
        context = red.context.clone()  # changed in place below
        with torch.no_grad(), method.apply_for_generation(tiny_sd1):
            outputs = [tiny_sd1.predict(x, t, red), tiny_sd1.predict(x, t, blue)]
            outputs.append(tiny_sd1.predict(x, t, type(red)(context)))
            context.mul_(0.5)
            outputs.append(tiny_sd1.predict(x, t, type(red)(context)))
            weights = list(method.modules[128][1].parameters())
            saved = [p.clone() for p in weights]
            for p in weights:
                p.mul_(1.5)
            outputs.append(tiny_sd1.predict(x, t, type(red)(context)))
            for p, before in zip(weights, saved):
                p.copy_(before)
        return outputs

    cached = run()
    _uncached(monkeypatch)
    uncached = run()
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    assert not any(torch.equal(a, b) for a, b in itertools.pairwise(cached))  # each case is a different result


def test_a_training_step_after_a_preview_on_the_same_context_still_trains_the_context_modules(tiny_sd1, method) -> None:
    x, t = _inputs(1)
    cond = tiny_sd1.encode_prompts(["a red ball"] * 2)

    def gradients(preview: bool) -> list[torch.Tensor]:
        with method.attached(tiny_sd1):
            if preview:
                with torch.no_grad(), method.apply_for_generation(tiny_sd1):
                    tiny_sd1.predict(x, t, cond)
            tiny_sd1.predict(x, t, cond).square().mean().backward()
            return [p.grad.clone() for p in method.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(gradients(True), gradients(False)))


def test_the_context_is_let_go_when_the_application_ends_and_when_training_detaches(tiny_sd1, method) -> None:
    x, t = _inputs(2)

    def held_after(run) -> tuple[bool, bool]:
        cond = tiny_sd1.encode_prompts(["a red ball"] * 2)
        ref = weakref.ref(cond.context)
        with run() as inside:
            inside(cond)
            del cond
            gc.collect()
            during = ref() is not None
        gc.collect()
        return during, ref() is not None

    class Generating:
        def __enter__(self):
            self.applied = method.apply_for_generation(tiny_sd1)
            self.applied.__enter__()
            return lambda cond: tiny_sd1.predict(x, t, cond)

        def __exit__(self, *exc):
            self.applied.__exit__(*exc)

    class Training:
        def __enter__(self):
            method.attach(tiny_sd1)
            return lambda cond: tiny_sd1.predict(x, t, cond).square().mean().backward()

        def __exit__(self, *exc):
            method.detach()

    with torch.no_grad():
        assert held_after(Generating) == (True, False)  # kept for the next sampling step, then let go
    assert held_after(Training) == (True, False)  # kept for gradient checkpointing's rerun, then let go


def test_strength_zero_runs_no_module(tiny_sd1, method) -> None:
    x, t = _inputs(3)
    cond = tiny_sd1.encode_prompts(["a red ball"] * 2)
    calls = _context_calls(method)
    with torch.no_grad():
        plain = tiny_sd1.predict(x, t, cond)
        with method.apply_for_generation(tiny_sd1, 0.0):
            zero = tiny_sd1.predict(x, t, cond)
    assert torch.equal(zero, plain) and calls == []


def test_an_affine_module_applies_as_one_matrix_with_the_formula_s_numbers(tiny_sd1, monkeypatch) -> None:
    linear = _made(tiny_sd1, "linear")  # A1111's default: Linear, Linear
    x, t = _inputs(4)
    cond = tiny_sd1.encode_prompts(["a red ball"] * 2)
    calls: list[int] = []
    linear.modules[32][0].register_forward_hook(lambda *_: calls.append(1))  # a feature width

    def run() -> list[torch.Tensor]:
        with torch.no_grad(), linear.apply_for_generation(tiny_sd1, 0.7):
            first = tiny_sd1.predict(x, t, cond)
            weights = list(linear.modules[32][1].parameters())
            saved = [p.clone() for p in weights]
            for p in weights:
                p.mul_(1.5)
            changed = tiny_sd1.predict(x, t, cond)
            for p, before in zip(weights, saved):
                p.copy_(before)
        return [first, changed]

    one_matrix = run()
    assert calls == []
    monkeypatch.setattr(hypernetwork_attach, "affine_form", lambda *_: None)
    formula = run()
    assert calls  # the stack ran
    for a, b in zip(one_matrix, formula):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    assert not torch.allclose(formula[0], formula[1], rtol=1e-3)  # the changed weights count


def test_only_an_affine_module_in_eval_mode_has_an_affine_form() -> None:
    def module(**structure) -> HypernetworkModule:
        return HypernetworkModule(8, Structure(**structure)).eval()

    assert affine_form(module(), 1.0) is not None
    assert affine_form(module(dropout_structure=(0, 0.3, 0)), 1.0) is not None  # dropout is off in eval mode
    assert affine_form(module(activation="relu"), 1.0) is None
    assert affine_form(module(layer_norm=True), 1.0) is None
    assert affine_form(module().train(), 1.0) is None


def test_a_hypernetwork_loaded_in_inference_mode_applies_as_one_loaded_outside_it(tiny_sd1, tmp_path) -> None:
    path = tmp_path / "hn.pt"
    _made(tiny_sd1, "linear").save(path, 1, {})
    cond = tiny_sd1.encode_prompts(["a red ball", ""])
    x, t = _inputs(0)
    with torch.no_grad(), HypernetworkMethod.load(path, tiny_sd1).apply_for_generation(tiny_sd1):
        expected = tiny_sd1.predict(x, t, cond)
    with torch.inference_mode():  # as a WebUI generates: the loaded parameters are inference tensors
        loaded = HypernetworkMethod.load(path, tiny_sd1)
        with loaded.apply_for_generation(tiny_sd1):
            got = [tiny_sd1.predict(x, t, cond) for _ in range(2)]
    assert all(torch.allclose(g, expected, atol=1e-6) for g in got)


def test_training_steps_compile_once_as_one_graph(tiny_sd1, method) -> None:
    """torch.compile traces a training step whole and the next step reuses it: the context's inputs
    are computed in each step without reading version counters (which dynamo cannot trace) or the
    previous step's (which it would guard on, compiling the second step again)."""
    x, t = _inputs(1)
    cond = tiny_sd1.encode_prompts(["a red ball"] * 2)
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs) -> object:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x: tiny_sd1.predict(x, t, cond), backend=counting_backend, dynamic=False)
    with method.attached(tiny_sd1):
        for _ in range(2):
            step(x).square().mean().backward()
    torch._dynamo.reset()
    assert len(graphs) == 1
