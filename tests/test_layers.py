"""`model.layers.is_linear`: which layers count as Linear layers (ours and the hosts')."""

import torch.nn.functional as F
from torch import nn

from lib_training.model.layers import is_linear


class LinearInAllButClass(nn.Module):
    """Like Forge's `ForgeOperations.Linear`: an nn.Module with the attributes and map of a Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(nn.Linear(in_features, out_features).weight.detach())
        self.bias = None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_an_nn_linear_is_a_linear_layer() -> None:
    assert is_linear(nn.Linear(4, 3))


def test_a_layer_with_a_linears_features_and_weight_is_a_linear_layer_whatever_its_class() -> None:
    assert is_linear(LinearInAllButClass(4, 3))


def test_layers_with_other_weights_are_not_linear_layers() -> None:
    assert not is_linear(nn.Conv2d(4, 3, 1))
    assert not is_linear(nn.LayerNorm(4))
    assert not is_linear(nn.Embedding(10, 4))
    assert not is_linear(nn.GELU())


def test_features_that_do_not_match_the_weight_are_not_a_linear_layer() -> None:
    layer = LinearInAllButClass(4, 3)
    layer.in_features = 5
    assert not is_linear(layer)
