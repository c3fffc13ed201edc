"""The building blocks of sessions: each temporary change is undone exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_training.hosts.snapshots import (
    AttributeSnapshot,
    HostModelChangedError,
    frozen,
    trainable_parameters,
    verified_unchanged,
)
from lib_training.model.hooks import ModuleHooks


class Base:
    def forward(self):
        return "base"


class Child(Base):
    pass


def test_attribute_snapshot_restores_the_same_objects_and_removes_what_was_inherited() -> None:
    def own(self):
        return "own"

    snapshot = AttributeSnapshot(Child, ["forward", "extra"])
    Child.forward = own
    Child.extra = 1
    snapshot.restore()
    assert "forward" not in vars(Child) and "extra" not in vars(Child)
    assert Child().forward() == "base"


def test_instance_overrides_are_removed_and_never_stack() -> None:
    module = nn.Linear(2, 2)
    overrides = ModuleHooks()
    overrides.install(module, "forward", lambda x: x)
    with pytest.raises(RuntimeError):
        overrides.install(module, "forward", lambda x: x)
    overrides.clear()
    assert "forward" not in module.__dict__ and len(overrides) == 0


def test_frozen_restores_each_flag_also_of_inference_tensors() -> None:
    with torch.inference_mode():
        inference = nn.Parameter(torch.ones(2))
    normal, fixed = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2), requires_grad=False)
    with frozen([inference, normal, fixed]):
        assert not any(p.requires_grad for p in (inference, normal, fixed))
    assert (inference.requires_grad, normal.requires_grad, fixed.requires_grad) == (True, True, False)


def test_trainable_parameters_replace_inference_tensors_in_every_slot_without_a_copy_and_give_them_back() -> None:
    with torch.inference_mode():
        embedding = nn.Embedding(4, 3)
        alias = nn.Module()
        alias.weight = embedding.weight  # one Parameter under two names, as Forge's TI wrapper does
        norm = nn.LayerNorm(3)
    model = nn.ModuleDict({"embedding": embedding, "alias": alias, "norm": norm})
    originals = list(model.named_parameters(remove_duplicate=False))
    x = torch.randn(2, 3, requires_grad=True)
    with trainable_parameters([model]) as replaced:
        assert replaced == 3
        assert alias.weight is embedding.weight and not embedding.weight.is_inference()
        assert embedding.weight.data_ptr() == originals[0][1].data_ptr()  # the same memory, not a copy
        norm(x + embedding.weight[:2]).sum().backward()
        assert x.grad is not None
    assert list(model.named_parameters(remove_duplicate=False)) == originals
    assert all(p.is_inference() and p.requires_grad for _, p in originals)


def test_verified_unchanged_names_a_change_and_lets_other_errors_through() -> None:
    module = nn.Linear(2, 2)
    with verified_unchanged({"m": module}):
        pass
    with pytest.raises(HostModelChangedError, match="weights"), verified_unchanged({"m": module}), torch.no_grad():
        module.weight.add_(1)
    with pytest.raises(KeyError), verified_unchanged({"m": module}), torch.no_grad():
        module.weight.add_(1)
        raise KeyError("the body's own error")
