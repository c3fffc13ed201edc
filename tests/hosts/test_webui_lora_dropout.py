"""LoRA dropout with gradient checkpointing on a WebUI's loaded model: the adapters' checkpointed blocks
replay the dropout generator too, so the LoRA's gradients are those without checkpointing."""

from __future__ import annotations

import pytest
import torch

from lib_training.hosts import extension
from lib_training.methods.lora import LoraConfig, LoraMethod

DROPOUT = {"dropout": 0.3, "rank_dropout": 0.3, "module_dropout": 0.2, "locon": True}


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_lora_dropout_gradients_are_the_same_with_checkpointing(kind, request, standalone) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone["sd1"])
    before = webui.snapshot()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    with extension.make_host().session() as model:
        method = LoraMethod(LoraConfig(name="zqx", rank=4, alpha=2.0, **DROPOUT))
        method.attach(model)
        try:
            with torch.no_grad():
                for module in method.network.lora.values():
                    module.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
            start = method.network.rng.get_state()
            for enabled in (False, True):
                method.network.rng.set_state(start)
                method.network.zero_grad(set_to_none=True)
                model.set_gradient_checkpointing(enabled)
                try:
                    cond = model.encode_prompts(["a photo of a red ball", "a blue cube"])
                    model.predict(x, torch.tensor([300, 700]), cond).square().mean().backward()
                finally:
                    model.set_gradient_checkpointing(False)
                grads = [p.grad.clone() for p in method.network.parameters() if p.grad is not None]
                results.append((grads, method.network.rng.get_state()))
        finally:
            method.detach()
    (plain, plain_state), (checkpointed, checkpointed_state) = results
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))
    assert torch.equal(plain_state, checkpointed_state)
    assert webui.snapshot() == before
