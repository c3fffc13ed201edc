"""DoRA training on the activations: the same outputs and gradients as the weight formula
(`lib_training.merge.dora`), without keeping weight-sized tensors for the backward pass. In a real Forge,
DoRA on full-size SDXL ran out of memory (24 GB) as every adapted layer kept W + ΔW and its scaled copies."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from lib_training.methods.lora.network import LoraNetwork, LowRankModule, Target, conv_args


class CastingLinear(nn.Linear):
    """Like Forge's Linear with manual casting: weight stored in fp16, used in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def _network(layer: nn.Module) -> LoraNetwork:
    generator = torch.Generator().manual_seed(0)
    module = LowRankModule(
        layer.weight.shape, 4, 2.0, conv=conv_args(layer), dora_from=layer.weight.float(), generator=generator
    )
    with torch.no_grad():  # a trained state: ΔW != 0 and d away from ‖W‖
        module.up.normal_(generator=generator)
        module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=generator))
    return LoraNetwork({"layer": module}, {"layer": Target("layer", layer)}, generator)


def _layers() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    linear = nn.Linear(24, 16).requires_grad_(False)
    conv = nn.Conv2d(8, 12, 3, padding=1, stride=2).requires_grad_(False)
    forge_like = CastingLinear(24, 16).requires_grad_(False).half()
    return [(linear, torch.randn(2, 5, 24)), (conv, torch.randn(2, 8, 9, 9)), (forge_like, torch.randn(2, 5, 24))]


def _by_weight_formula(layer: nn.Module, network: LoraNetwork, x: torch.Tensor) -> torch.Tensor:
    adapted = network.lora["layer"].adapted_weight(layer.weight.float(), 1.0)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, adapted, layer.bias)
    return F.linear(x, adapted, layer.bias.float())


def test_dora_on_activations_gives_the_outputs_and_gradients_of_the_weight_formula() -> None:
    for layer, x in _layers():
        network = _network(layer)
        params = list(network.lora["layer"].parameters())
        expected = _by_weight_formula(layer, network, x)
        expected_grads = torch.autograd.grad(expected.square().sum(), params)
        network.attach()
        try:
            y = layer(x)
        finally:
            network.detach()
        grads = torch.autograd.grad(y.square().sum(), params)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def _kept_for_backward(layer: nn.Module, x: torch.Tensor, network: LoraNetwork | None) -> Counter[int]:
    """Sizes (elements) of the tensors autograd keeps for the backward pass, besides the layer's own weight."""
    weight_storage = layer.weight.untyped_storage().data_ptr()
    kept: Counter[int] = Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() != weight_storage:
            kept[tensor.numel()] += 1
        return tensor

    if network is not None:
        network.attach()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(x.requires_grad_()).sum().backward()
    finally:
        if network is not None:
            network.detach()
    return kept


def test_dora_keeps_no_weight_sized_tensor_for_the_backward_pass() -> None:
    """Neither on an fp32 layer nor on an fp16 one used in fp32 (whose own forward keeps its cast copy)."""
    for layer in (nn.Linear(256, 256), CastingLinear(256, 256).half()):
        layer.requires_grad_(False)
        x = torch.randn(2, 3, 256)
        added = _kept_for_backward(layer, x, _network(layer)) - _kept_for_backward(layer, x, None)
        assert max(added) < layer.weight.numel() // 4, f"{type(layer).__name__}: kept {sorted(added)} elements"
