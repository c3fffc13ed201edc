"""The hypernetwork's module: a residual MLP on the context that a k or v projection sees.

A hypernetwork holds, per context width, two `HypernetworkModule`s (one for k, one for v). Each is
A1111's stack, built the same way so that its `linear.N.*` keys number the same positions:

    for each pair of neighbouring entries in the layer structure (widths dim * s_i -> dim * s_i+1):
        Linear
        activation          (not after the last Linear unless `activate_output`; none for "linear")
        LayerNorm           (when `layer_norm`)
        Dropout(p)          (when the dropout structure's entry for that layer's output is > 0)

and applies `x + mlp(x) * strength` (strength 1 while training). New weights are initialised as
A1111 does: Linear weights by the chosen init with zero biases, and every LayerNorm with weights
drawn from N(0, 0.01) and zero biases whatever the init (A1111 treats LayerNorm like "Normal").

Dropout masks are drawn from a generator seeded by the caller (the call site and the training
step), not from torch's global generator, so that a resumed run repeats them exactly and gradient
checkpointing recomputes the same masks; the distribution is nn.Dropout's.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lib_training.errors import ConfigError

# A1111's own names first; then every activation class torch.nn offers, by its lower-case name
# (A1111 adds them the same way, so "swish" is Hardswish and "silu" is SiLU).
_A1111_NAMED: dict[str, type[nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
_TORCH_NAMED: dict[str, type[nn.Module]] = {
    name.lower(): cls
    for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
    if cls.__module__ == "torch.nn.modules.activation"
}
# Accepted by A1111's lookup but unable to work in the stack: why, for the error message.
_UNUSABLE = {
    "multiheadattention": "it is an attention layer that needs arguments, not an activation",
    "threshold": "it needs a threshold and a value, which a hypernetwork file cannot give",
    "glu": "it halves the width, so the next layer would not fit",
}
ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {
    name: cls for name, cls in {**_A1111_NAMED, **_TORCH_NAMED}.items() if name not in _UNUSABLE
}
ACTIVATIONS = tuple(ACTIVATION_CLASSES)
WEIGHT_INITS = ("Normal", "KaimingUniform", "KaimingNormal", "XavierUniform", "XavierNormal")
NORMAL_STD = 0.01  # A1111's "Normal" init, also used for every LayerNorm weight

_NUMBER_LIST = re.compile(r"^\s*[^,]+(\s*,\s*[^,]+)*\s*$")


def parse_numbers(text: str, what: str, example: str) -> list[float]:
    """ "1, 2, 1" -> [1.0, 2.0, 1.0]; a ConfigError naming `what` if it is not a comma-separated list."""
    if not _NUMBER_LIST.match(text or ""):
        raise ConfigError(f"the {what} {text!r} is not a comma-separated list of numbers; write e.g. {example!r}")
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"the {what} {text!r} is not a comma-separated list of numbers; write e.g. {example!r}"
        ) from None


def check_layer_structure(values: Sequence[float]) -> list[float]:
    """The layer structure (width multipliers) if A1111 can build it; else a ConfigError saying why."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ConfigError(f"the layer structure {values} needs at least two entries, e.g. '1, 2, 1'")
    if values[0] != 1 or values[-1] != 1:
        raise ConfigError(
            f"the layer structure {_show(values)} must start and end with 1 (the module maps the context "
            "back to its own width); e.g. '1, 2, 1' or '1, 1.5, 1.5, 1'"
        )
    if any(not v > 0 for v in values):
        raise ConfigError(f"the layer structure {_show(values)} has a multiplier that is not positive")
    return values


def check_dropout_structure(
    values: Sequence[float], layer_structure: Sequence[float], *, strict: bool = True
) -> list[float]:
    """A dropout probability per layer-structure entry, each in [0, 1), first and last 0.

    Not `strict` (files A1111 wrote): only what building needs, an entry per layer-structure entry
    (extra ones are ignored, as A1111 does) and each in [0, 1)."""
    values = [float(v) for v in values]
    if not strict and len(values) >= len(layer_structure):
        values = values[: len(layer_structure)]
    elif len(values) != len(layer_structure):
        raise ConfigError(
            f"the dropout structure {_show(values)} needs one probability per layer-structure entry "
            f"({len(layer_structure)} for {_show(layer_structure)}), e.g. '0, 0.3, 0'"
        )
    if strict and (values[0] != 0 or values[-1] != 0):
        raise ConfigError(
            f"the dropout structure {_show(values)} must start and end with 0 (there is no dropout on the "
            "input or on the output)"
        )
    if any(not 0 <= v < 1 for v in values):
        raise ConfigError(f"the dropout structure {_show(values)} has a probability outside [0, 1)")
    return values


def check_activation(name: str | None) -> str | None:
    """The activation's name as A1111 stores it (lower case), or a ConfigError listing the choices."""
    if name is None:
        return None
    key = name.strip().lower()
    if key in _UNUSABLE:
        raise ConfigError(f"the activation {name!r} cannot be used: {_UNUSABLE[key]}")
    if key not in ACTIVATION_CLASSES:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return key


def check_weight_init(name: str) -> str:
    if name not in WEIGHT_INITS:
        raise ConfigError(f"unknown weight initialisation {name!r}; choose one of {', '.join(WEIGHT_INITS)}")
    return name


@dataclass(frozen=True)
class Structure:
    """Everything that shapes a hypernetwork's modules (the same for every width, as in A1111)."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str | None = "linear"  # None in old A1111 files: no activation
    weight_init: str = "Normal"
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)
    activate_output: bool = False

    def __post_init__(self) -> None:
        check_layer_structure(self.layer_structure)
        check_dropout_structure(self.dropout_structure, self.layer_structure, strict=False)
        check_activation(self.activation)
        check_weight_init(self.weight_init)

    def widths(self, dim: int) -> list[int]:
        """Widths of the stack for context width `dim` (A1111 truncates dim * multiplier to an int)."""
        widths = [int(dim * s) for s in self.layer_structure]
        if min(widths) < 1:
            raise ConfigError(
                f"the layer structure {_show(self.layer_structure)} makes a layer of width 0 for width {dim}; "
                "use larger multipliers"
            )
        return widths

    def layers(self, dim: int) -> list[nn.Module]:
        """The stack for width `dim`, in A1111's order (see the module docstring)."""
        widths = self.widths(dim)
        last = len(widths) - 2
        stack: list[nn.Module] = []
        for i in range(len(widths) - 1):
            stack.append(nn.Linear(widths[i], widths[i + 1]))
            if self.activation not in (None, "linear") and (i < last or self.activate_output):
                stack.append(ACTIVATION_CLASSES[self.activation]())
            if self.layer_norm:
                stack.append(nn.LayerNorm(widths[i + 1]))
            if self.dropout_structure[i + 1] > 0:
                stack.append(nn.Dropout(p=self.dropout_structure[i + 1]))
        return stack


class HypernetworkModule(nn.Module):
    """x [..., dim] -> x + mlp(x) * strength; `linear` is A1111's Sequential (its keys `linear.N.*`)."""

    def __init__(self, dim: int, structure: Structure) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Sequential(*structure.layers(dim))

    @torch.no_grad()
    def initialise(self, weight_init: str, activation: str | None, generator: torch.Generator | None = None) -> None:
        """A1111's initialisation of new weights (see the module docstring)."""
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue  # PReLU keeps its own start (0.25), as in A1111
            weight, bias = layer.weight, layer.bias
            bias.zero_()
            if weight_init == "Normal" or type(layer) is nn.LayerNorm:
                nn.init.normal_(weight, mean=0.0, std=NORMAL_STD, generator=generator)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(weight, generator=generator)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(weight, generator=generator)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity, generator=generator)
            elif weight_init == "KaimingNormal":
                nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity, generator=generator)
            else:
                raise ConfigError(f"unknown weight initialisation {weight_init!r}")

    def forward(self, x: Tensor, strength: float = 1.0, dropout_seed: int | None = None) -> Tensor:
        """x [..., dim]. In training mode the strength is 1 (as A1111) and dropout is on; its masks
        come from `dropout_seed` (each Dropout of the stack from seed + its position)."""
        h = x
        for position, layer in enumerate(self.linear):
            if isinstance(layer, nn.Dropout):
                h = _dropout(h, layer.p, dropout_seed, position) if self.training else h
            else:
                h = layer(h)
        return torch.add(x, h, alpha=1.0 if self.training else strength)  # x + h * strength in one pass


@torch.no_grad()
def affine_form(module: HypernetworkModule, strength: float) -> tuple[Tensor, Tensor] | None:
    """(a [dim, dim], c [dim]) with `module(x, strength) == x @ a + c` (up to rounding) when the module
    is affine: in eval mode and every layer a Linear (activation 'linear' and no layer norm; dropout
    is off in eval mode). Such a stack is one matrix: x + (W_n(...(W_1 x + b_1)...) + b_n) * strength.
    None for any other module."""
    layers = [layer for layer in module.linear if not isinstance(layer, nn.Dropout)]
    if module.training or not all(type(layer) is nn.Linear for layer in layers):
        return None
    weight, bias = layers[0].weight, layers[0].bias  # the stack so far: x @ weight.T + bias
    for layer in layers[1:]:
        weight, bias = layer.weight @ weight, layer.weight @ bias + layer.bias
    a = torch.eye(module.dim, dtype=weight.dtype, device=weight.device) + weight.t() * strength
    return a, bias * strength


def _dropout(h: Tensor, p: float, seed: int | None, position: int) -> Tensor:
    if p <= 0:
        return h
    if seed is None:
        return nn.functional.dropout(h, p, training=True)
    generator = torch.Generator(device=h.device).manual_seed((seed + position) % 2**63)
    keep = torch.rand(h.shape, generator=generator, device=h.device) >= p  # [..., width] bool
    return h * keep.to(h.dtype) / (1.0 - p)


def _show(values: Sequence[float]) -> str:
    return "'" + ", ".join(f"{v:g}" for v in values) + "'"
