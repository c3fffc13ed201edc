"""A plain LoRA computed inside its layer's own autograd node (`model.networks.fused`): the same results
and gradients as the LoRA's module forward, and that forward wherever anything else is on the layer."""

from __future__ import annotations

import pytest
import torch
from lora_support import model_state, randomise, small_lora
from test_fast_path import minimal_unet, tiny_unet, unet_loss
from torch import nn

from lib_training.methods.lora.network import Dropout, LoraNetwork, LowRankModule, Target, conv_args
from lib_training.model.hooks import ModuleHooks
from lib_training.model.memory_format import channels_last
from lib_training.model.networks.fused import LOW_RANK, fusable, fused_linear, joint_linear, linear, runs_on_tokens
from lib_training.model.standalone import load_model
from lib_training.training.compiled import CompiledUNet


def unmarked(network: LoraNetwork) -> None:
    """Take the LoRA's marks off its forwards: every layer then runs the LoRA's module forward (today's path)."""
    for target in network.targets.values():
        forward = target.layer.__dict__.get("forward")
        if forward is not None and hasattr(forward, LOW_RANK):
            delattr(forward, LOW_RANK)


def lora_on(layers: dict[str, nn.Module], rank: int = 3, alpha: float = 2.0, seed: int = 0) -> LoraNetwork:
    """An attached LoRA on `layers` with non-zero up weights."""
    generator = torch.Generator().manual_seed(seed)
    modules, targets = {}, {}
    for name, layer in layers.items():
        module = LowRankModule(layer.weight.shape, rank, alpha, conv=conv_args(layer))
        with torch.no_grad():
            module.up.copy_(torch.randn(module.up.shape, generator=generator))
        modules[name], targets[name] = module, Target(name, layer)
    network = LoraNetwork(modules, targets, torch.Generator())
    network.attach()
    return network


def values_and_grads(run, x: torch.Tensor, network: LoraNetwork) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    network.zero_grad(set_to_none=True)
    out = run(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in network.parameters())]


def assert_close_all(got, want, **tolerance) -> None:
    torch.testing.assert_close(got[0], want[0], **tolerance)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, **tolerance)


TOLERANCES = {torch.float32: {}, torch.bfloat16: {"atol": 0.05, "rtol": 0.02}}
REORDERED = {"atol": 1e-4, "rtol": 1e-4}  # fp32 sums in another order (channels-last normalisation; compiled)


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], **tolerance) -> None:
    """Gradients by name, relative to the largest of all (the summation order differs between the paths,
    and some gradients are ~0: softmax over the one token of a 1x1 feature map)."""
    assert got.keys() == want.keys()
    scale = max(grad.abs().max().item() for grad in want.values())
    for name, grad in want.items():
        message = lambda m, name=name: f"{name}: {m}"  # noqa: E731
        torch.testing.assert_close(got[name] / scale, grad / scale, **tolerance, msg=message)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_qkv_with_three_loras_equals_each_layers_module_forward(dtype) -> None:
    torch.manual_seed(0)
    layers = {name: nn.Linear(8, 6, bias=False) for name in "qkv"}
    network = lora_on(layers)
    linears = list(layers.values())
    assert fusable(linears)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        fused = values_and_grads(lambda x: torch.cat(fused_linear(x, linears), dim=-1), x, network)
        separate = values_and_grads(lambda x: torch.cat([m(x) for m in linears], dim=-1), x, network)
    assert fused[0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in fused[1])
    assert_close_all(fused, separate, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_on_a_linear_with_bias_and_a_1x1_conv_equals_the_module_forward(dtype) -> None:
    torch.manual_seed(1)
    layers = {"linear": nn.Linear(8, 5), "conv": nn.Conv2d(8, 5, 1)}
    network = lora_on(layers, alpha=4.0)
    network.multiplier = 0.7
    assert runs_on_tokens(layers["conv"])
    tokens = torch.randn(2, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        for layer in layers.values():
            fused = values_and_grads(lambda x, layer=layer: linear(layer, x), tokens, network)
            if isinstance(layer, nn.Conv2d):  # the module on the feature map [B, C, 2, 3], back to tokens
                module = values_and_grads(
                    lambda x, layer=layer: layer(x.transpose(1, 2).reshape(2, 8, 2, 3)).flatten(2).transpose(1, 2),
                    tokens,
                    network,
                )
            else:
                module = values_and_grads(layer, tokens, network)
            assert fused[0].grad_fn is None and fused[0].shape == module[0].shape
            assert_close_all(fused, module, **TOLERANCES[dtype])


def test_the_layer_and_its_lora_are_one_autograd_node() -> None:
    layers = {name: nn.Linear(8, 6, bias=False) for name in "qkv"}
    lora_on(layers)
    x = torch.randn(4, 8, requires_grad=True)
    assert type(linear(layers["q"], x).grad_fn).__name__ == "_JointLinearBackward"
    assert type(joint_linear(x, list(layers.values())).grad_fn).__name__ == "_JointLinearBackward"


def test_calling_the_layer_as_a_module_still_adds_the_lora() -> None:
    layer = nn.Linear(8, 6)
    x = torch.randn(4, 8)
    before = layer(x)
    lora_on({"layer": layer})
    assert not torch.allclose(layer(x), before)
    torch.testing.assert_close(layer(x), linear(layer, x))


def overrides_on_top(layer: nn.Module, hooks: ModuleHooks, kind: str) -> None:
    if kind == "second lora":
        lora_on({"layer": layer}, seed=1)
    elif kind == "hypernetwork":
        hooks.transform_input(layer, lambda x: x * 2)
    elif kind == "host override":
        inner = layer.forward
        object.__setattr__(layer, "forward", lambda x: inner(x) + 1)
    elif kind == "torch hook":
        layer.register_forward_hook(lambda module, args, out: out + 1)


@pytest.mark.parametrize("kind", ["second lora", "hypernetwork", "host override", "torch hook"])
def test_anything_else_on_the_layer_makes_it_run_as_a_module(kind) -> None:
    layer, other = nn.Linear(8, 6), nn.Linear(8, 6)
    lora_on({"layer": layer, "other": other})
    overrides_on_top(layer, ModuleHooks(), kind)
    assert not fusable((layer, other))
    x = torch.randn(4, 8)
    torch.testing.assert_close(linear(layer, x), layer(x))
    assert linear(layer, x).grad_fn is None or type(linear(layer, x).grad_fn).__name__ != "_JointLinearBackward"


def test_a_lora_attached_over_another_override_is_not_fused() -> None:
    layer, other = nn.Linear(8, 6), nn.Linear(8, 6)
    hooks = ModuleHooks()
    hooks.transform_input(layer, lambda x: x * 2)
    lora_on({"layer": layer, "other": other})
    assert not fusable((layer, other))
    x = torch.randn(4, 8)
    torch.testing.assert_close(linear(layer, x), layer(x))


@pytest.mark.parametrize("dropout", [Dropout(neuron=0.2), Dropout(rank=0.2), Dropout(module=0.2)])
def test_a_training_lora_with_dropout_runs_as_a_module_and_without_it_in_eval(dropout) -> None:
    layer, other = nn.Linear(8, 6), nn.Linear(8, 6)
    network = lora_on({"layer": layer, "other": other})
    network.dropout = dropout
    network.train()
    assert not fusable((layer, other))
    network.eval()
    assert fusable((layer, other))


def test_a_dora_layer_runs_as_a_module() -> None:
    layer, other = nn.Linear(8, 6), nn.Linear(8, 6)
    lora_on({"other": other})
    module = LowRankModule(layer.weight.shape, 3, 2.0, dora_from=layer.weight.detach())
    network = LoraNetwork({"layer": module}, {"layer": Target("layer", layer)}, torch.Generator())
    network.attach()
    assert fusable((other, other)) and not fusable((layer, other))
    x = torch.randn(4, 8)
    torch.testing.assert_close(linear(layer, x), layer(x))


def test_a_3x3_locon_is_not_run_on_tokens() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    lora_on({"conv": conv})
    assert not runs_on_tokens(conv)


def test_detach_leaves_the_layers_plain_and_fused_again() -> None:
    layers = {name: nn.Linear(8, 6, bias=False) for name in "qkv"}
    network = lora_on(layers)
    network.detach()
    assert all("forward" not in m.__dict__ for m in layers.values())
    x = torch.randn(4, 8)
    torch.testing.assert_close(linear(layers["q"], x), layers["q"](x))


def unet_loss_and_grads(model, method, checkpointing: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    method.network.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(5)
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    cond = model.encode_prompts(["a red ball", "a blue cube on a table"])
    model.set_gradient_checkpointing(checkpointing)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=method.bf16):
            loss = model.predict(x_t, torch.tensor([100, 700]), cond).float().square().mean()
        loss.backward()
    finally:
        model.set_gradient_checkpointing(False)
    return loss.detach(), {name: p.grad.clone() for name, p in method.network.named_parameters()}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_unet_gives_the_loss_and_gradients_of_the_unfused_lora(arch, dtype, tiny_checkpoints) -> None:
    model = load_model(tiny_checkpoints[arch])
    before = model_state(model)
    method = small_lora()
    method.attach(model)
    method.bf16 = dtype is torch.bfloat16
    try:
        randomise(method)
        fused = unet_loss_and_grads(model, method)
        checkpointed = unet_loss_and_grads(model, method, checkpointing=True)
        unmarked(method.network)
        unfused = unet_loss_and_grads(model, method)
    finally:
        method.detach()
    assert model_state(model) == before
    for got in (fused, checkpointed):
        torch.testing.assert_close(got[0], unfused[0], **TOLERANCES[dtype])
        assert_grads_close(got[1], unfused[1], **TOLERANCES[dtype])


def graph_nodes(loss: torch.Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_a_lora_unet_step_records_fewer_autograd_nodes_than_the_unfused_lora(tiny_sd1) -> None:
    method = small_lora()
    method.attach(tiny_sd1)
    try:
        x_t = torch.randn(1, 4, 8, 8)
        cond = tiny_sd1.encode_prompts(["a red ball"])
        fused = graph_nodes(tiny_sd1.predict(x_t, torch.tensor([100]), cond).square().mean())
        unmarked(method.network)
        unfused = graph_nodes(tiny_sd1.predict(x_t, torch.tensor([100]), cond).square().mean())
    finally:
        method.detach()
    assert fused < unfused - 4 * len(method.network.lora)  # each LoRA'd layer: 5+ nodes fewer


def lora_on_transformers(model) -> LoraNetwork:
    """A LoRA on every Linear and 1x1 convolution of the UNet's spatial transformers (kohya's default set)."""
    layers = {
        f"{index}_{name}".replace(".", "_"): module
        for index, transformer in enumerate(model.transformers)
        for name, module in transformer.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }
    return lora_on(layers)


def test_a_lora_unet_in_channels_last_gives_the_contiguous_loss_and_gradients() -> None:
    model = tiny_unet().requires_grad_(False)
    network = lora_on_transformers(model)
    loss = unet_loss(model, model)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    network.zero_grad(set_to_none=True)
    with channels_last([model]):
        loss_nhwc = unet_loss(model, model, torch.channels_last)
        loss_nhwc.backward()
    network.detach()
    torch.testing.assert_close(loss_nhwc, loss, rtol=1e-5, atol=0)
    assert_grads_close({name: p.grad for name, p in network.named_parameters()}, grads, **REORDERED)


@pytest.mark.slow
def test_a_compiled_lora_unet_gives_the_eager_loss_and_gradients() -> None:
    """aot_eager, as tests/test_fast_path.py's compile test; ~15 s on 2 busy cores."""
    model = minimal_unet().requires_grad_(False)
    network = lora_on_transformers(model)
    loss = unet_loss(model, model)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    network.zero_grad(set_to_none=True)
    compiled = CompiledUNet(model, backend="aot_eager")
    loss_compiled = unet_loss(compiled, model)
    loss_compiled.backward()
    network.detach()
    assert compiled.fallback == ""
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=0)
    assert_grads_close({name: p.grad for name, p in network.named_parameters()}, grads, **REORDERED)


def graph_breaks(model, context_requires_grad: bool = False) -> int:
    """Graph breaks torch.compile meets in a training call of `model` (torch._dynamo.explain)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, model.config.context_dim, generator=gen).requires_grad_(context_requires_grad)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x, t, c: model(x, t, c))(x, torch.tensor([5, 500]), context)
    return explanation.graph_break_count


def test_a_lora_unet_compiles_as_one_graph() -> None:
    """A break at each layer (as once at every frozen Linear on an input without gradient, the time
    embedding's) splits the compiled step into pieces that recompile per shape until dynamo gives up."""
    model = minimal_unet().requires_grad_(False)
    network = lora_on_transformers(model)
    try:
        assert graph_breaks(model) == 0
    finally:
        network.detach()


def test_a_frozen_unet_with_a_trained_context_compiles_as_one_graph() -> None:
    """Textual inversion's UNet call: nothing in the UNet trains, the context has a gradient."""
    assert graph_breaks(minimal_unet().requires_grad_(False), context_requires_grad=True) == 0
