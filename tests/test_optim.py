"""Optimizers by name, optional packages, and gradient clipping."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn

from lib_training.errors import ConfigError
from lib_training.training.optim import (
    OPTIMIZER_NAMES,
    all_finite,
    available_optimizers,
    build_optimizer,
    clip_gradients,
)


def _param(*values: float, grad: list[float] | None = None) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor(values))
    if grad is not None:
        p.grad = torch.tensor(grad)
    return p


def test_adamw_gets_the_given_settings() -> None:
    p = _param(1.0, 2.0)
    optimizer = build_optimizer("AdamW", [p], 0.003, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        0.003,
        0.01,
        (0.8, 0.99),
        1e-6,
    )


def test_adamw_is_not_fused_for_cpu_parameters() -> None:
    optimizer = build_optimizer("adamw", [_param(1.0)], 0.1)
    assert not optimizer.param_groups[0]["fused"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adamw_is_fused_for_cuda_parameters() -> None:
    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    optimizer = build_optimizer("adamw", [p], 0.1)
    assert optimizer.param_groups[0]["fused"]
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.allclose(p.detach().cpu(), torch.full((3,), 0.9), atol=1e-6)


def test_adamw_accepts_param_groups() -> None:
    a, b = _param(1.0), _param(2.0)
    optimizer = build_optimizer("adamw", [{"params": [a]}, {"params": [b], "lr": 0.5}], 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5]


def test_adamw_takes_a_step() -> None:
    p = _param(1.0, grad=[1.0])
    build_optimizer("adamw", [p], 0.1).step()
    assert p.item() == pytest.approx(0.9, abs=1e-6)  # Adam's first step moves by lr against the gradient


def test_unknown_optimizer_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as error:
        build_optimizer("sgd", [_param(1.0)], 0.1)
    assert all(name in str(error.value) for name in OPTIMIZER_NAMES)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("adamw8bit", "bitsandbytes", "bitsandbytes"), ("prodigy", "prodigyopt", "prodigyopt")],
)
def test_missing_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        build_optimizer(name, [_param(1.0)], 0.1)
    assert name not in available_optimizers()
    assert "adamw" in available_optimizers()


def test_prodigy_is_built_from_prodigyopt_with_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    built: dict[str, object] = {}

    class FakeProdigy(torch.optim.SGD):
        def __init__(self, params, **options) -> None:
            built.update(options)
            super().__init__(params, lr=options["lr"])

    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=FakeProdigy))
    optimizer = build_optimizer("prodigy", [_param(1.0)], 1.0, weight_decay=0.01, extra={"d_coef": 2.0})
    assert isinstance(optimizer, FakeProdigy)
    assert built == {"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "d_coef": 2.0}


def test_a_package_that_fails_to_load_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def import_module(name: str):
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available")
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ConfigError, match="failed to load \\(CUDA Setup failed"):
        build_optimizer("adamw8bit", [_param(1.0)], 0.1)


# --- gradient clipping ----------------------------------------------------------------------------


def test_clip_by_value_clamps_each_element_and_returns_the_norm_before() -> None:
    p = _param(0.0, 0.0, 0.0, grad=[3.0, -4.0, 0.5])
    norm = clip_gradients([p], "value", 1.0)
    assert norm.item() == pytest.approx((9 + 16 + 0.25) ** 0.5)
    assert p.grad.tolist() == [1.0, -1.0, 0.5]


def test_clip_by_norm_rescales_to_the_limit() -> None:
    a, b = _param(0.0, 0.0, grad=[3.0, 0.0]), _param(0.0, grad=[4.0])
    norm = clip_gradients([a, b], "norm", 1.0)
    assert norm.item() == pytest.approx(5.0)
    after = torch.cat([a.grad, b.grad]).norm().item()
    assert after == pytest.approx(1.0, rel=1e-5)
    assert a.grad[0].item() / b.grad[0].item() == pytest.approx(0.75)


def test_clip_by_norm_leaves_small_gradients_alone() -> None:
    p = _param(0.0, 0.0, grad=[0.3, 0.4])
    clip_gradients([p], "norm", 1.0)
    assert p.grad.tolist() == pytest.approx([0.3, 0.4])


def test_no_clipping_still_reports_the_norm() -> None:
    p = _param(0.0, 0.0, grad=[30.0, 40.0])
    assert clip_gradients([p], None, None).item() == pytest.approx(50.0)
    assert p.grad.tolist() == [30.0, 40.0]


def test_parameters_without_gradients_are_skipped() -> None:
    assert clip_gradients([_param(1.0)], "norm", 1.0).item() == 0.0
    assert clip_gradients([_param(1.0), _param(0.0, grad=[2.0])], "value", 1.0).item() == pytest.approx(2.0)


def test_clipping_needs_a_positive_limit_and_a_known_mode() -> None:
    p = _param(0.0, grad=[1.0])
    with pytest.raises(ConfigError, match="greater than 0"):
        clip_gradients([p], "norm", 0.0)
    with pytest.raises(ConfigError, match="value or norm"):
        clip_gradients([p], "max", 1.0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_all_finite_finds_one_bad_element_among_the_parameters(bad) -> None:
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.full((5,), 3e38)), torch.randn(2).bfloat16()]
    assert all_finite(params) and all_finite([])
    with torch.no_grad():
        params[0][1, 2] = bad
    assert not all_finite(params)
