"""Stand-in for Forge's `backend.operations`: the layer classes Forge builds its models with.

Forge constructs every UNet and text encoder under `using_forge_operations`, which puts
`ForgeOperations.Linear` in place of `torch.nn.Linear` while the model is built. That class is a
plain `nn.Module`, not an `nn.Linear`: it has `in_features`, `out_features`, a `weight` [out, in]
and a `bias`, and its forward is the linear map, casting the weight and bias to the input's dtype
when manual casting is on. (Its Conv2d, by contrast, subclasses `nn.Conv2d`.)

`forge_linears(root)` gives a built model those layers, keeping each layer's own parameters.
"""

import torch
import torch.nn.functional as F


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.weight = None
            self.bias = None
            self.parameters_manual_cast = False

        def forward(self, x):
            weight, bias = self.weight, self.bias
            if self.parameters_manual_cast:
                weight = weight.to(x.dtype)
                bias = None if bias is None else bias.to(x.dtype)
            return F.linear(x, weight, bias)


def forge_linears(root: torch.nn.Module) -> torch.nn.Module:
    """Replace every `nn.Linear` under `root` by a `ForgeOperations.Linear` holding the same parameters."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                layer = ForgeOperations.Linear(child.in_features, child.out_features)
                layer.weight, layer.bias = child.weight, child.bias
                layer.train(child.training)
                setattr(module, name, layer)
    return root
