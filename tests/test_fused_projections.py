"""Joint matmuls in the UNet (q/k/v, cross-attention k/v, ResBlock time projections): same results,
same parameters, and overrides on the Linear layers are honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_training.formats.family import Arch
from lib_training.model.hooks import ModuleHooks
from lib_training.model.networks.attention import CrossAttention
from lib_training.model.networks.fused import fusable, fused_linear, linear, runs_on_tokens
from lib_training.model.networks.unet import ResBlock, UNetConfig, UNetModel
from lib_training.model.tiny import randomize_weights


def tiny_unet(arch: Arch) -> UNetModel:
    model = UNetModel(UNetConfig.tiny(arch))
    randomize_weights(model, torch.Generator().manual_seed(0))
    return model.train()


def loss_and_grads(model: UNetModel, y_dim: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, model.config.context_dim, generator=gen)
    y = None if y_dim is None else torch.randn(2, y_dim, generator=gen)
    model.zero_grad(set_to_none=True)
    loss = model(x, torch.tensor([5, 500]), context, y).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def unfuse_all(model: UNetModel, hooks: ModuleHooks) -> None:
    """A pass-through override on every Linear and convolution: nothing may be fused any more, every
    Linear runs as a module and SD1's 1x1 projections run as convolutions on the feature map."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.wrap_forward(module, lambda forward, *args, **kwargs: forward(*args, **kwargs))


def test_fused_linear_matches_separate_layers_in_value_and_gradients() -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 4), nn.Linear(8, 6)]
    x = torch.randn(2, 3, 8, requires_grad=True)
    fused = torch.cat(fused_linear(x, layers), dim=-1)
    fused.square().sum().backward()
    fused_grads = [x.grad.clone()] + [p.grad.clone() for layer in layers for p in layer.parameters()]

    x.grad = None
    for layer in layers:
        layer.zero_grad()
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    separate.square().sum().backward()
    grads = [x.grad] + [p.grad for layer in layers for p in layer.parameters()]

    torch.testing.assert_close(fused, separate)
    for got, want in zip(fused_grads, grads):
        torch.testing.assert_close(got, want)


def test_fused_linear_under_autocast_computes_in_the_autocast_dtype_and_keeps_fp32_gradients() -> None:
    layers = [nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)]
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear(x, layers)
    assert all(o.dtype == torch.bfloat16 for o in out)
    sum(o.float().sum() for o in out).backward()
    assert x.grad.dtype == torch.float32 and layers[0].weight.grad.dtype == torch.float32


def test_a_hooked_or_overridden_linear_is_not_fusable() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    assert fusable((a, b))
    hooks = ModuleHooks()
    hooks.add_to_output(a, lambda x: x * 0)
    assert not fusable((a, b))
    hooks.clear()
    handle = b.register_forward_hook(lambda *_: None)
    assert not fusable((a, b))
    handle.remove()
    assert fusable((a, b))


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD2, Arch.SDXL], ids=["sd1", "sd2", "sdxl"])
def test_fused_unet_gives_the_loss_and_gradients_of_the_unfused_one(arch: Arch) -> None:
    model = tiny_unet(arch)
    y_dim = model.config.adm_in_channels
    loss, grads = loss_and_grads(model, y_dim)
    hooks = ModuleHooks()
    unfuse_all(model, hooks)
    try:
        loss_unfused, grads_unfused = loss_and_grads(model, y_dim)
    finally:
        hooks.clear()
    torch.testing.assert_close(loss, loss_unfused, rtol=1e-5, atol=0)
    for name, grad in grads_unfused.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_overrides_on_projections_and_time_layers_are_called() -> None:
    """A LoRA sets `forward` on to_q/to_k/to_v, the other Linears, SD1's 1x1 projections and ResBlock
    layers: each must run once per step."""
    model = tiny_unet(Arch.SD1)
    attention = next(m for m in model.modules() if isinstance(m, CrossAttention))
    transformer = model.middle_block[1]
    cross = transformer.transformer_blocks[0].attn2
    resblock = next(m for m in model.modules() if isinstance(m, ResBlock))
    targets = {
        "self to_v": attention.to_v,
        "self to_out": attention.to_out[0],
        "cross to_q": cross.to_q,
        "cross to_k": cross.to_k,
        "cross to_v": cross.to_v,
        "feed-forward in": transformer.transformer_blocks[0].ff.net[0].proj,
        "feed-forward out": transformer.transformer_blocks[0].ff.net[2],
        "proj_in (1x1 conv)": transformer.proj_in,
        "proj_out (1x1 conv)": transformer.proj_out,
        "time embedding": model.time_embed[2],
        "emb": resblock.emb_layers[1],
    }
    calls = dict.fromkeys(targets, 0)
    hooks = ModuleHooks()
    for name, module in targets.items():

        def count(forward, x, _name=name):
            calls[_name] += 1
            return forward(x)

        hooks.wrap_forward(module, count)
    try:
        loss_and_grads(model)
    finally:
        hooks.clear()
    assert calls == dict.fromkeys(targets, 1)


def test_an_override_changes_the_output_where_fusing_would_have_skipped_it() -> None:
    model = tiny_unet(Arch.SD1).eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, model.config.context_dim)
    with torch.no_grad():
        plain = model(x, torch.tensor([10]), context)
    hooks = ModuleHooks()
    hooks.add_to_output(model.middle_block[1].transformer_blocks[0].attn2.to_k, lambda h: torch.ones_like(h))
    try:
        with torch.no_grad():
            changed = model(x, torch.tensor([10]), context)
    finally:
        hooks.clear()
    assert not torch.allclose(plain, changed)


def test_a_plain_1x1_projection_runs_as_a_linear_on_tokens_with_the_convolutions_result() -> None:
    conv = nn.Conv2d(8, 6, 1)
    feature_map = torch.randn(2, 8, 3, 5, requires_grad=True)
    tokens = feature_map.permute(0, 2, 3, 1)  # [B, H, W, C]
    assert runs_on_tokens(conv)
    out = linear(conv, tokens).permute(0, 3, 1, 2)
    out.square().sum().backward()
    grads = [feature_map.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
    feature_map.grad = None
    conv.zero_grad()
    reference = conv(feature_map)
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference)
    assert conv.weight.grad.shape == (6, 8, 1, 1)
    for got, want in zip(grads, [feature_map.grad, conv.weight.grad, conv.bias.grad]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layer", [nn.Linear(8, 6), nn.Conv2d(8, 6, 1)], ids=["linear", "1x1 conv"])
def test_a_single_layer_under_autocast_computes_in_bf16_like_the_module_and_keeps_fp32_gradients(layer) -> None:
    tokens = torch.randn(2, 5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(layer, tokens)
        if isinstance(layer, nn.Linear):
            reference = layer(tokens)
        else:
            reference = layer(tokens.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference)
    out.float().square().sum().backward()
    assert tokens.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert layer.weight.grad.shape == layer.weight.shape


def test_a_hooked_or_strided_1x1_convolution_does_not_run_on_tokens() -> None:
    conv = nn.Conv2d(8, 8, 1)
    hooks = ModuleHooks()
    hooks.wrap_forward(conv, lambda forward, x: forward(x))
    assert not runs_on_tokens(conv)
    hooks.clear()
    assert runs_on_tokens(conv)
    assert not runs_on_tokens(nn.Conv2d(8, 8, 1, stride=2)) and not runs_on_tokens(nn.Conv2d(8, 8, 3))


def test_a_host_subclass_with_its_own_forward_gets_no_precomputed_projections() -> None:
    """A WebUI's ResBlock keeps ldm's forward(x, emb): the UNet must not hand it a third argument."""

    class HostResBlock(ResBlock):
        def forward(self, x, emb):  # ldm's signature
            return self._forward(x, emb)

    model = tiny_unet(Arch.SD1).eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, model.config.context_dim)
    with torch.no_grad():
        plain = model(x, torch.tensor([10]), context)
        for module in model.modules():
            if type(module) is ResBlock:
                module.__class__ = HostResBlock
        hosted = model(x, torch.tensor([10]), context)
    torch.testing.assert_close(hosted, plain)
