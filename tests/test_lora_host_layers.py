"""LoRA and DoRA hooks on a host's own Linear class: Forge builds its models with a Linear that is no
`nn.Linear`, keeps its weights in fp16 and casts them to the input's dtype (seen in a real Forge, where
DoRA on its fp16 text encoder failed with "expected m1 and m2 to have the same dtype")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib_training.methods.lora.network import LoraNetwork, LowRankModule, Target


class CastingLinear(nn.Module):
    """Like Forge's `ForgeOperations.Linear` with manual casting: weight stored in fp16, used in x's dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.half(), requires_grad=False)
        self.bias = None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def _network(layer: nn.Module, dora: bool) -> LoraNetwork:
    generator = torch.Generator().manual_seed(0)
    module = LowRankModule(
        layer.weight.shape, 2, 2.0, dora_from=layer.weight.float() if dora else None, generator=generator
    )
    with torch.no_grad():
        module.up.normal_(generator=generator)
    return LoraNetwork({"layer": module}, {"layer": Target("layer", layer)}, generator)


def _attached_output(network: LoraNetwork, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) with the network attached (detached again afterwards)."""
    network.attach()
    try:
        return layer(x)
    finally:
        network.detach()


def test_dora_on_an_fp16_layer_that_casts_to_the_input_dtype_gives_the_fp32_adapted_output() -> None:
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    layer = CastingLinear(weight)
    network = _network(layer, dora=True)
    x = torch.randn(3, 5)
    y = _attached_output(network, layer, x)
    stored = layer.weight.float()
    expected = F.linear(x, network.lora["layer"].adapted_weight(stored, 1.0))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected)


def test_lora_on_an_fp16_layer_that_casts_to_the_input_dtype_adds_its_change_in_fp32() -> None:
    layer = CastingLinear(torch.randn(6, 5, generator=torch.Generator().manual_seed(1)))
    network = _network(layer, dora=False)
    x = torch.randn(3, 5)
    y = _attached_output(network, layer, x)
    expected = F.linear(x, layer.weight.float() + network.lora["layer"].delta())
    torch.testing.assert_close(y, expected)
