"""The fast path of a run: channels-last weights, a compiled UNet call, selective checkpointing and
the peak memory in the run log. Every switch gives the eager result and leaves the model as it was."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_training.dataset import DatasetConfig
from lib_training.formats.family import Arch
from lib_training.formats.fingerprint import hooks_snapshot, weights_fingerprint
from lib_training.methods.embedding import EmbeddingConfig, EmbeddingMethod
from lib_training.model.memory_format import channels_last, to_channels_last, use_channels_last
from lib_training.model.networks.attention import SpatialTransformer
from lib_training.model.networks.unet import ResBlock, UNetConfig, UNetModel
from lib_training.model.networks.vae import AutoencoderKL, VAEConfig
from lib_training.model.tiny import randomize_weights
from lib_training.options import SettingsError, from_dict
from lib_training.training.compiled import CUDA_GRAPHS_MODE, CompiledUNet, compile_plan, use_compile
from lib_training.training.config import LoopConfig
from lib_training.training.run import train

FAST = LoopConfig(steps=3, save_every=0, preview_every=0, latent_sampling="mean")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_unet(arch: Arch = Arch.SD1) -> UNetModel:
    model = UNetModel(UNetConfig.tiny(arch))
    randomize_weights(model, torch.Generator().manual_seed(0))
    return model.train()


def minimal_unet() -> UNetModel:
    """One level, one ResBlock and one transformer: the smallest UNet, for compile tests."""
    config = UNetConfig(
        model_channels=32, channel_mult=(1,), transformer_depth=(1,), num_res_blocks=1, context_dim=32, num_heads=2
    )
    model = UNetModel(config)
    randomize_weights(model, torch.Generator().manual_seed(0))
    return model.train()


def unet_loss(unet, model: UNetModel, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen).contiguous(memory_format=memory_format)
    context = torch.randn(2, 7, model.config.context_dim, generator=gen)
    return unet(x, torch.tensor([5, 500]), context).square().mean()


def strides(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: t.stride() for name, t in module.state_dict(keep_vars=True).items()}


# --- channels-last -------------------------------------------------------------------------------
def test_channels_last_stores_conv_weights_nhwc_inside_and_restores_them_after() -> None:
    unet, vae = tiny_unet(), AutoencoderKL(VAEConfig.tiny())
    modules = {"unet": unet, "vae": vae}
    before, before_strides = weights_fingerprint(modules), {k: strides(m) for k, m in modules.items()}
    conv = unet.input_blocks[1][0].in_layers[2].weight
    with channels_last(modules.values()):
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert weights_fingerprint(modules) == before  # the same values
    assert weights_fingerprint(modules) == before
    assert {k: strides(m) for k, m in modules.items()} == before_strides
    assert conv.is_contiguous()


def test_channels_last_restores_the_model_when_the_job_fails() -> None:
    unet = tiny_unet()
    before = strides(unet)
    with pytest.raises(RuntimeError, match="boom"), channels_last([unet]):
        raise RuntimeError("boom")
    assert strides(unet) == before


def test_channels_last_unet_gives_the_eager_loss_and_gradients() -> None:
    model = tiny_unet()
    loss = unet_loss(model, model)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with channels_last([model]):
        loss_nhwc = unet_loss(model, model, torch.channels_last)
        loss_nhwc.backward()
    torch.testing.assert_close(loss_nhwc, loss, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_is_on_by_default_only_on_cuda() -> None:
    assert use_channels_last("auto", torch.device("cuda"))
    assert not use_channels_last("auto", torch.device("cpu"))
    assert use_channels_last("on", torch.device("cpu")) and not use_channels_last("off", torch.device("cuda"))


def test_to_channels_last_leaves_non_image_tensors_alone() -> None:
    tokens = torch.randn(2, 7, 3)
    assert to_channels_last(tokens) is tokens
    assert to_channels_last(torch.randn(1, 4, 3, 3)).is_contiguous(memory_format=torch.channels_last)


# --- compiled UNet call ----------------------------------------------------------------------------
def test_compile_is_off_by_default_on_the_cpu() -> None:
    assert not use_compile("auto", torch.device("cpu"))
    assert use_compile("on", torch.device("cpu")) and not use_compile("off", torch.device("cuda"))


def test_a_compile_that_cannot_start_falls_back_to_eager_with_a_message(monkeypatch) -> None:
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    messages: list[str] = []
    model = minimal_unet()
    compiled = CompiledUNet(model, on_fallback=messages.append)
    torch.testing.assert_close(unet_loss(compiled, model), unet_loss(model, model))
    assert len(messages) == 1 and "no compiler here" in messages[0] and "without compiling" in messages[0]
    assert compiled.fallback == messages[0]


def test_a_compile_that_fails_on_the_first_call_falls_back_to_eager_with_a_message() -> None:
    def failing_backend(graph, example_inputs):
        raise RuntimeError("backend broke")

    messages: list[str] = []
    unet = lambda x, t, c, y=None: x * 2 + c.mean()  # noqa: E731
    compiled = CompiledUNet(unet, on_fallback=messages.append, backend=failing_backend)
    x, c = torch.ones(1, 4, 2, 2, requires_grad=True), torch.zeros(1, 3, 5)
    out = compiled(x, torch.tensor([1]), c)
    torch.testing.assert_close(out, x * 2)
    assert len(messages) == 1 and "backend broke" in messages[0]
    compiled(x, torch.tensor([1]), c)  # no second attempt, no second message
    assert len(messages) == 1


def test_compiled_calls_without_gradients_run_eagerly(monkeypatch) -> None:
    calls = []
    compiled = CompiledUNet(lambda x, t, c, y=None: x, backend="eager")
    monkeypatch.setattr(compiled, "_compiled", lambda *a: calls.append(a) or a[0])
    with torch.no_grad():
        compiled(torch.ones(1), torch.ones(1), torch.ones(1))
    assert calls == []


# --- CUDA graphs ------------------------------------------------------------------------------------
def test_cuda_graphs_is_a_compile_setting_of_the_loop() -> None:
    assert from_dict(LoopConfig, {"compile": "cuda-graphs"}).compile == "cuda-graphs"
    with pytest.raises(SettingsError, match="compile"):
        from_dict(LoopConfig, {"compile": "cuda-graph"})


def test_cuda_graphs_on_the_cpu_fall_back_to_eager_with_a_message() -> None:
    plan = compile_plan("cuda-graphs", torch.device("cpu"))
    assert plan.mode is None and plan.label == "off"
    assert "need a CUDA device" in plan.note and "without compiling" in plan.note


def test_cuda_graphs_where_torch_lacks_them_fall_back_to_auto_with_a_message(monkeypatch) -> None:
    monkeypatch.delattr(torch.compiler, "cudagraph_mark_step_begin")
    plan = compile_plan("cuda-graphs", torch.device("cuda"))
    assert plan.mode != CUDA_GRAPHS_MODE and plan.mode == compile_plan("auto", torch.device("cuda")).mode
    assert "torch 2.1 or newer" in plan.note


def test_cuda_graphs_are_not_used_with_gradient_accumulation(monkeypatch) -> None:
    monkeypatch.setattr("lib_training.training.compiled.cuda_graphs_unavailable", lambda device: "")
    assert compile_plan("cuda-graphs", torch.device("cuda")).mode == CUDA_GRAPHS_MODE
    plan = compile_plan("cuda-graphs", torch.device("cuda"), one_forward_per_backward=False)
    assert plan.mode != CUDA_GRAPHS_MODE and "one UNet call per backward pass" in plan.note


def test_the_other_compile_settings_carry_no_message() -> None:
    for setting in ("auto", "off", "on"):
        assert compile_plan(setting, torch.device("cpu")).note == ""
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_plan("fast", torch.device("cpu"))


def test_a_cuda_graph_run_on_the_cpu_trains_eagerly_with_the_eager_losses_and_says_so(tiny_sd1, images, tmp_path):
    before = model_state(tiny_sd1)
    eager, _, _ = run(tiny_sd1, images, tmp_path / "eager", compile="off")
    graphs, config, messages = run(tiny_sd1, images, tmp_path / "graphs", compile="cuda-graphs")
    assert graphs == eager
    assert config["end"]["compile"] == "off" and "need a CUDA device" in config["end"]["compile_note"]
    assert any("need a CUDA device" in m for m in messages)
    assert model_state(tiny_sd1) == before


def test_a_cuda_graph_compile_that_fails_names_cuda_graphs_and_runs_eagerly() -> None:
    def failing_backend(graph, example_inputs):
        raise RuntimeError("backend broke")

    messages: list[str] = []
    unet = lambda x, t, c, y=None: x * 2  # noqa: E731
    compiled = CompiledUNet(unet, on_fallback=messages.append, backend=failing_backend, mode=CUDA_GRAPHS_MODE)
    x = torch.ones(1, 4, 2, 2, requires_grad=True)
    torch.testing.assert_close(compiled(x, torch.tensor([1]), torch.zeros(1, 3, 5)), x * 2)
    assert len(messages) == 1 and "with CUDA graphs failed" in messages[0]


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_loss_and_gradients() -> None:
    """Dynamo and AOT autograd on the CPU (aot_eager: the graphs torch.compile builds, without
    code generation); measured ~30 s on 2 busy cores."""
    model = minimal_unet()
    loss = unet_loss(model, model)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = CompiledUNet(model, backend="aot_eager")
    loss_compiled = unet_loss(compiled, model)
    loss_compiled.backward()
    assert compiled.fallback == ""
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --- selective checkpointing ----------------------------------------------------------------------
def test_a_checkpoint_fraction_recomputes_the_highest_resolution_blocks_first() -> None:
    model = tiny_unet()
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    model.set_gradient_checkpointing(True, 0.25)
    chosen = [m for m in blocks if m.gradient_checkpointing]
    assert len(chosen) == -(-len(blocks) // 4)
    assert max(m.level for m in chosen) <= min(m.level for m in blocks if not m.gradient_checkpointing)
    model.set_gradient_checkpointing(False)
    assert not any(m.gradient_checkpointing for m in blocks)


def test_partial_checkpointing_gives_the_same_loss() -> None:
    model = tiny_unet()
    loss = unet_loss(model, model)
    model.set_gradient_checkpointing(True, 0.5)
    torch.testing.assert_close(unet_loss(model, model), loss, rtol=1e-6, atol=0)


# --- the trainer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}-a ball.png")
    return folder


def run(model, images: Path, out: Path, **loop_changes) -> tuple[list[float], dict, list[str]]:
    messages: list[str] = []
    data = DatasetConfig(path=str(images), size=64, template="subject")
    method = EmbeddingMethod(EmbeddingConfig(name="zqx", init_text="ball", vectors=1))
    loop = dataclasses.replace(FAST, **loop_changes)
    train(model, method, data, loop, out, on_progress=lambda p: p.message and messages.append(p.message))
    losses = [float(row.split(",")[1]) for row in (out / "loss.csv").read_text().splitlines()[1:]]
    return losses, json.loads((out / "config.json").read_text()), messages


def model_state(model) -> tuple:
    return weights_fingerprint(model.modules), hooks_snapshot(model.modules), strides(model.unet_module)


def test_a_channels_last_run_gives_the_eager_losses_and_leaves_the_model_as_it_was(tiny_sd1, images, tmp_path):
    before = model_state(tiny_sd1)
    eager, _, _ = run(tiny_sd1, images, tmp_path / "eager", channels_last="off")
    nhwc, config, _ = run(tiny_sd1, images, tmp_path / "nhwc", channels_last="on")
    assert model_state(tiny_sd1) == before
    assert config["end"]["channels_last"] is True
    torch.testing.assert_close(torch.tensor(nhwc), torch.tensor(eager), rtol=1e-4, atol=1e-6)


def test_a_run_whose_compile_fails_trains_eagerly_and_says_so(tiny_sd1, images, tmp_path, monkeypatch):
    eager, _, _ = run(tiny_sd1, images, tmp_path / "eager", compile="off")

    def broken_compile(*args, **kwargs):
        raise RuntimeError("torch.compile is broken here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    unet = tiny_sd1.unet
    losses, config, messages = run(tiny_sd1, images, tmp_path / "compiled", compile="on")
    assert tiny_sd1.unet is unet  # the model's own UNet call is back
    assert losses == eager
    assert any("torch.compile is broken here" in m for m in messages)
    assert config["end"]["compile"].startswith("failed: torch.compile failed")


def test_the_run_log_records_peak_memory(tiny_sd1, images, tmp_path) -> None:
    _, config, _ = run(tiny_sd1, images, tmp_path)
    end = config["end"]
    assert end["step"] == FAST.steps and end["peak_memory_mib"] > 0 and end["peak_memory_of"]
    assert end["compile"] == "off" and end["channels_last"] is False  # the CPU defaults


# --- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@CUDA
def test_channels_last_unet_on_cuda_keeps_activations_nhwc_and_matches_eager() -> None:
    model = tiny_unet().cuda()
    x = torch.randn(2, 4, 16, 16, device="cuda")
    context = torch.randn(2, 7, model.config.context_dim, device="cuda")
    t = torch.tensor([5, 500], device="cuda")
    eager = model(x, t, context)
    seen = []
    handle = model.input_blocks[4][0].register_forward_hook(lambda m, i, o: seen.append(o))
    with channels_last([model]):
        nhwc = model(to_channels_last(x), t, context)
    handle.remove()
    assert seen[-1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@CUDA
def test_compiled_unet_on_cuda_matches_eager() -> None:
    model = tiny_unet().cuda()
    x = torch.randn(2, 4, 16, 16, device="cuda")
    context = torch.randn(2, 7, model.config.context_dim, device="cuda")
    t = torch.tensor([5, 500], device="cuda")
    eager = model(x, t, context)
    compiled = CompiledUNet(model)
    out = compiled(x, t, context)
    assert compiled.fallback == ""
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@CUDA
def test_cuda_graph_unet_on_cuda_gives_the_eager_loss_and_gradients_over_repeated_steps() -> None:
    """Three steps of one shape (the graphs are recorded, then replayed) and one of another shape, on the
    smallest UNet (each shape compiles its forward and backward)."""
    if compile_plan("cuda-graphs", torch.device("cuda")).mode != CUDA_GRAPHS_MODE:
        pytest.skip(compile_plan("cuda-graphs", torch.device("cuda")).note)
    model = minimal_unet().cuda()
    compiled = CompiledUNet(model, mode=CUDA_GRAPHS_MODE)
    gen = torch.Generator(device="cuda").manual_seed(2)
    for side in (16, 16, 16, 8):
        x = torch.randn(2, 4, side, side, device="cuda", generator=gen)
        context = torch.randn(2, 7, model.config.context_dim, device="cuda", generator=gen, requires_grad=True)
        t = torch.tensor([5, 500], device="cuda")
        eager_loss = model(x, t, context).square().mean()
        (eager_grad,) = torch.autograd.grad(eager_loss, context)
        loss = compiled(x, t, context).square().mean()
        (grad,) = torch.autograd.grad(loss, context)
        assert compiled.fallback == ""
        torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-3, atol=1e-5)
