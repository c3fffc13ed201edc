"""Hypernetwork training on the tiny models: it learns, resumes exactly, attaches where A1111 does,
applies at generation, and leaves the model as it was."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lib_training.dataset import DatasetConfig, TrainingDataset
from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.fingerprint import hooks_snapshot, requires_grad_snapshot, weights_fingerprint
from lib_training.formats.hypernetwork_file import optim_path, read_hypernetwork
from lib_training.methods.applied import ResultFile, results_applied
from lib_training.methods.hypernetwork import HypernetworkConfig, HypernetworkMethod
from lib_training.methods.hypernetwork_attach import find_kv_sites
from lib_training.training.config import LoopConfig
from lib_training.training.run import train
from lib_training.training.trainer import TrainingError

FAST = LoopConfig(steps=6, save_every=0, preview_every=0, latent_sampling="mean", lr="0.0005")


@pytest.fixture(scope="module")
def balls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("balls")
    for i, background in enumerate([(20, 120, 200), (30, 160, 60), (200, 200, 40)]):
        image = Image.new("RGB", (64, 64), background)
        offset = 8 + 4 * i
        ImageDraw.Draw(image).ellipse((offset, offset, offset + 36, offset + 36), fill=(240, 40, 30))
        image.save(folder / f"{i:05d}-a red ball.png")
    return folder


def _data(folder: Path, **changes) -> DatasetConfig:
    return DatasetConfig(path=str(folder), size=64, template="filewords", **changes)


def _method(**changes) -> HypernetworkMethod:
    return HypernetworkMethod(HypernetworkConfig(name="hn", **changes))


def _model_state(model):
    return weights_fingerprint(model.modules), hooks_snapshot(model.modules), requires_grad_snapshot(model.modules)


def eval_loss(model, images: Path, method: HypernetworkMethod | None, count: int = 16) -> float:
    """Mean loss over a fixed set of (image, noise, timestep) with the prompt 'a photo of a red ball'."""
    dataset = TrainingDataset(_data(images), name="hn")
    pictures = torch.stack([dataset.load_image(view) for view in dataset.views()])
    latents = model.encode_images(pictures).repeat_interleave(count // len(pictures) + 1, 0)[:count]
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.linspace(50, 950, count).long()
    applied = method.apply_for_generation(model) if method else contextlib.nullcontext()
    with torch.no_grad(), applied:
        x_t = model.schedule.add_noise(latents, noise, timesteps)
        prediction = model.predict(x_t, timesteps, model.encode_prompts(["a photo of a red ball"] * count))
        target = model.schedule.target(latents, noise, timesteps)
        return torch.nn.functional.mse_loss(prediction.float(), target.float()).item()


def randomised(method: HypernetworkMethod, seed: int) -> HypernetworkMethod:
    """The same structure with random weights of the trained weights' norms (tensor by tensor)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in method.modules.values():
            for module in pair:
                for p in module.parameters():
                    r = torch.randn(p.shape, generator=generator)
                    p.copy_(r / r.norm() * p.norm())
    return method


# --- it learns ------------------------------------------------------------------------------------


def test_hypernetwork_lowers_the_loss_on_a_fixed_evaluation_set(tiny_sd1, balls, tmp_path) -> None:
    """Threshold: 5% below the model without it, and below each of 6 random hypernetworks of the
    trained weights' norms. Measured: 0.90 of the start after 45 steps at lr 5e-4; random ones of
    the same norms stay within 0.1% of the start."""
    before = eval_loss(tiny_sd1, balls, None)
    result = train(tiny_sd1, _method(), _data(balls), dataclasses.replace(FAST, steps=45), tmp_path)
    after = eval_loss(tiny_sd1, balls, HypernetworkMethod.load(result.result, tiny_sd1))
    floor = [
        eval_loss(tiny_sd1, balls, randomised(HypernetworkMethod.load(result.result, tiny_sd1), s)) for s in range(6)
    ]
    assert after < 0.95 * before, (before, after)
    assert after < min(floor), (after, floor)


# --- attaching -----------------------------------------------------------------------------------


def test_attach_transforms_what_every_k_and_v_of_a_width_read_and_leaves_q_alone(tiny_sd1) -> None:
    method = _method(widths="128")
    sites = find_kv_sites(tiny_sd1)
    method.attach(tiny_sd1)
    try:
        hooked = {site.name for site in sites if "forward" in site.to_k.__dict__ and "forward" in site.to_v.__dict__}
        assert hooked == {site.name for site in sites if site.width == 128}
        assert {s.width for s in sites if s.cross} == {128} and any(not s.cross and s.width == 128 for s in sites)
        assert not any("forward" in m.__dict__ for n, m in tiny_sd1.unet_module.named_modules() if n.endswith("to_q"))
        site = next(s for s in sites if s.cross)
        x = torch.randn(2, 77, 128)
        mlp_k, mlp_v = method.modules[128]
        plain_k = torch.nn.functional.linear(x, site.to_k.weight)
        assert torch.allclose(site.to_k(x), torch.nn.functional.linear(mlp_k(x), site.to_k.weight), atol=1e-6)
        assert torch.allclose(site.to_v(x), torch.nn.functional.linear(mlp_v(x), site.to_v.weight), atol=1e-6)
        assert not torch.allclose(site.to_k(x), plain_k)
    finally:
        method.detach()


def test_auto_widths_are_the_context_and_every_feature_width(tiny_sd1, tiny_sdxl) -> None:
    for model, expected in ((tiny_sd1, [128, 32, 64]), (tiny_sdxl, [192, 64, 128])):
        method = _method()
        with method.attached(model):
            assert list(method.modules) == expected


def test_a_width_the_model_does_not_have_is_refused_naming_those_it_has(tiny_sd1) -> None:
    with pytest.raises(ConfigError, match=r"read widths 128 \(text context\), 32, 64; 768 is not one of them"):
        _method(widths="128, 768").attach(tiny_sd1)


def test_model_is_unchanged_after_training_applying_and_detaching(tiny_sd1, balls, tmp_path) -> None:
    before = _model_state(tiny_sd1)
    loop = dataclasses.replace(FAST, steps=3, gradient_checkpointing=True, preview_every=3, preview_steps=2)
    result = train(tiny_sd1, _method(dropout="0, 0.3, 0"), _data(balls), loop, tmp_path)
    assert _model_state(tiny_sd1) == before
    assert all(p.grad is None for m in tiny_sd1.modules.values() for p in m.parameters())
    with HypernetworkMethod.load(result.result, tiny_sd1).apply_for_generation(tiny_sd1, 0.8):
        assert _model_state(tiny_sd1) != before
    assert _model_state(tiny_sd1) == before


def test_the_preview_during_training_applies_the_hypernetwork_without_dropout(tiny_sd1) -> None:
    method = _method(dropout="0, 0.3, 0")
    with method.attached(tiny_sd1):
        hooks = hooks_snapshot(tiny_sd1.modules)
        with method.apply_for_generation(tiny_sd1):
            assert hooks_snapshot(tiny_sd1.modules) == hooks
            assert not any(m.training for pair in method.modules.values() for m in pair)
        assert all(m.training for pair in method.modules.values() for m in pair)


# --- resume --------------------------------------------------------------------------------------


def test_interrupt_then_resume_ends_bit_identical_to_an_uninterrupted_run(tiny_sd1, balls, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=8, batch_size=2, latent_sampling="random")
    method = dict(dropout="0, 0.3, 0", activation="relu", layer_norm=True)
    straight = train(tiny_sd1, _method(**method), _data(balls, flip=True), loop, tmp_path / "a")
    calls = iter(range(100))
    first = train(tiny_sd1, _method(**method), _data(balls, flip=True), loop, tmp_path / "b",
                  should_stop=lambda: next(calls) >= 3)  # fmt: skip
    assert first.interrupted and first.step == 3
    resumed = train(tiny_sd1, _method(**method), _data(balls, flip=True), loop, tmp_path / "b", resume=True)
    assert resumed.step == 8
    a, b = read_hypernetwork(straight.result), read_hypernetwork(resumed.result)
    for width in a.layers:
        for left, right in zip(a.layers[width], b.layers[width]):
            assert all(torch.equal(left[k], right[k]) for k in left)


# --- results -------------------------------------------------------------------------------------


def test_run_writes_name_pt_with_adamw_state_beside_it(tiny_sd1, balls, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=4, save_every=2)
    result = train(tiny_sd1, _method(), _data(balls), loop, tmp_path, file_metadata={"sd_checkpoint": "abc"})
    assert result.result == tmp_path / "hn.pt"
    saved = read_hypernetwork(result.result)
    assert saved.step == 4 and saved.sd_checkpoint == "abc" and list(saved.layers) == [128, 32, 64]
    record = torch.load(optim_path(result.result), weights_only=True)
    params = len(HypernetworkMethod.load(result.result, tiny_sd1).param_groups()[0].params)
    assert len(record["optimizer_state_dict"]["param_groups"][0]["params"]) == params
    assert optim_path(tmp_path / "checkpoints" / "hn-2.pt").is_file()


def test_continue_from_a_file_keeps_its_structure_counts_its_steps_and_takes_its_optimizer(
    tiny_sd1, balls, tmp_path
) -> None:
    first = train(tiny_sd1, _method(activation="relu", layer_structure="1, 1.5, 1"), _data(balls),
                  dataclasses.replace(FAST, steps=2), tmp_path / "a")  # fmt: skip
    method = _method(continue_from=str(first.result))  # its structure settings are the defaults, ignored
    with method.attached(tiny_sd1):
        assert method.structure.activation == "relu" and method.structure.layer_structure == (1.0, 1.5, 1.0)
        assert method.initial_optimizer_state() is not None
    second = train(tiny_sd1, method, _data(balls), dataclasses.replace(FAST, steps=3), tmp_path / "b")
    assert read_hypernetwork(second.result).step == 5


def test_nan_loss_stops_and_keeps_the_last_good_file(tiny_sd1, balls, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    original = type(tiny_sd1).predict

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(type(tiny_sd1), "predict", poisoned)
    with pytest.raises(TrainingError, match="the loss became nan"):
        train(tiny_sd1, _method(), _data(balls), dataclasses.replace(FAST, save_every=2), tmp_path)
    monkeypatch.undo()
    kept = read_hypernetwork(tmp_path / "hn.pt")
    assert kept.step == 4 and all(
        torch.isfinite(t).all() for pair in kept.layers.values() for s in pair for t in s.values()
    )


def test_a_file_for_another_family_is_refused_at_load(tiny_sd1, tiny_sdxl, tmp_path) -> None:
    method = _method(widths="192")
    with method.attached(tiny_sdxl):
        method.save(tmp_path / "xl.pt", 1, {})
    with pytest.raises(CheckpointError, match="made for another model family"):
        HypernetworkMethod.load(tmp_path / "xl.pt", tiny_sd1)


# --- applied at generation -----------------------------------------------------------------------


def test_prompt_tag_applies_at_its_strength_and_strength_zero_changes_nothing(tiny_sd1, tmp_path) -> None:
    method = _method()
    with method.attached(tiny_sd1):
        with torch.no_grad():
            for pair in method.modules.values():
                for module in pair:
                    for p in module.parameters():
                        p.normal_(0, 0.2)
        method.save(tmp_path / "hn.pt", 1, {})
    files = [ResultFile("hypernetwork", "hn", tmp_path / "hn.pt")]
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])

    def predict(prompt: str) -> torch.Tensor:
        with torch.no_grad(), results_applied(tiny_sd1, [prompt], files) as applied:
            assert applied.prompts == ["a red ball"]
            return tiny_sd1.predict(x, t, tiny_sd1.encode_prompts(applied.prompts))

    before = _model_state(tiny_sd1)
    plain = predict("a red ball")
    assert torch.equal(predict("<hypernet:hn:0> a red ball"), plain)
    half, full = predict("<hypernet:hn:0.5> a red ball"), predict("<hypernet:hn> a red ball")
    assert not torch.allclose(half, plain) and not torch.allclose(half, full)
    assert _model_state(tiny_sd1) == before


def test_sdxl_trains_modules_for_its_context_and_feature_widths(tiny_sdxl, balls, tmp_path) -> None:
    result = train(tiny_sdxl, _method(), _data(balls), dataclasses.replace(FAST, steps=2), tmp_path)
    saved = read_hypernetwork(result.result)
    assert list(saved.layers) == [192, 64, 128]
    fresh = _method()
    with fresh.attached(tiny_sdxl):
        start = fresh.modules[192][0].state_dict()
    assert not torch.equal(saved.layers[192][0]["linear.0.weight"], start["linear.0.weight"])


# --- command line ----------------------------------------------------------------------------------


def test_cli_trains_and_writes_name_pt(tiny_checkpoints, balls, tmp_path, capsys) -> None:
    from lib_training.app.cli import main

    out = tmp_path / "run"
    code = main(["train", "hypernetwork", "--ckpt", str(tiny_checkpoints["sd1"]), "--data", str(balls),
                 "--name", "hn", "--out", str(out), "--steps", "2", "--size", "64", "--layer-structure", "1,2,1",
                 "--activation", "relu", "--layer-norm", "--dropout", "0, 0.3, 0", "--preview-every", "0",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    saved = read_hypernetwork(out / "hn.pt")
    assert (saved.activation_func, saved.is_layer_norm, saved.dropout_structure) == ("relu", True, [0.0, 0.3, 0.0])
    assert '"lr": "0.000005"' in (out / "config.json").read_text()  # the method's default learning rate
    assert "finished after 2 steps" in capsys.readouterr().out


def test_cli_create_writes_a_file_that_training_continues(tiny_checkpoints, balls, tmp_path, capsys) -> None:
    from lib_training.app.cli import main

    code = main(["hypernetwork", "create", "--name", "made", "--out", str(tmp_path), "--widths", "128, 32, 64",
                 "--layer-structure", "1, 1.5, 1", "--activation", "swish",
                 "--weight-init", "XavierNormal"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    made = read_hypernetwork(tmp_path / "made.pt")
    assert list(made.layers) == [128, 32, 64] and made.step == 0 and made.layer_structure == [1.0, 1.5, 1.0]
    assert "wrote" in capsys.readouterr().out
    code = main(["train", "hypernetwork", "--ckpt", str(tiny_checkpoints["sd1"]), "--data", str(balls),
                 "--name", "made", "--out", str(tmp_path / "run"), "--steps", "2", "--size", "64",
                 "--continue-from", str(tmp_path / "made.pt"), "--preview-every", "0", "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    trained = read_hypernetwork(tmp_path / "run" / "made.pt")
    assert trained.step == 2 and trained.activation_func == "swish" and trained.layer_structure == [1.0, 1.5, 1.0]


def test_cli_create_refuses_a_bad_layer_structure(tmp_path, capsys) -> None:
    from lib_training.app.cli import main

    code = main(["hypernetwork", "create", "--name", "bad", "--out", str(tmp_path), "--layer-structure", "1, 2"])
    assert code == 2 and "must start and end with 1" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_each_prompt_is_encoded_once_as_nothing_trained_changes_its_conditioning(
    tiny_sd1, balls, tmp_path, monkeypatch
):
    calls = []
    original = type(tiny_sd1).encode_prompts

    def counting(self, prompts, *args, **kwargs):
        calls.append(tuple(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(type(tiny_sd1), "encode_prompts", counting)
    train(tiny_sd1, _method(), _data(balls), dataclasses.replace(FAST, steps=12), tmp_path)
    assert len(calls) == len(set(calls)) < 12


@pytest.mark.parametrize("checkpointing", [False, True])
def test_context_modules_run_once_per_unet_call_with_the_same_result_and_gradients(
    tiny_sd1, monkeypatch, checkpointing
) -> None:
    from lib_training.methods.hypernetwork_attach import Attachment

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = tiny_sd1.encode_prompts(["a red ball", "a blue cube"])

    def run(shared: bool):
        if not shared:
            monkeypatch.setattr(Attachment, "_unet_call", lambda self, forward, *a, **k: forward(*a, **k))
        method = _method(activation="relu")
        calls = []
        with method.attached(tiny_sd1):
            method.modules[128][0].register_forward_hook(lambda *_: calls.append(1))
            tiny_sd1.set_gradient_checkpointing(checkpointing)
            try:
                tiny_sd1.predict(x, t, cond).square().mean().backward()
            finally:
                tiny_sd1.set_gradient_checkpointing(False)
            grads = [p.grad.clone() for p in method.parameters()]
        monkeypatch.undo()
        return grads, len(calls)

    separate, separate_calls = run(shared=False)
    shared, shared_calls = run(shared=True)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(separate, shared))
    self_128 = sum(1 for s in find_kv_sites(tiny_sd1) if not s.cross and s.width == 128)  # they have their own input
    reruns = 2 if checkpointing else 1  # checkpointing runs each layer again in the backward pass
    assert shared_calls == 1 + self_128 * reruns  # the context's once, at the UNet's entry
    assert separate_calls == (16 + self_128) * reruns


def test_the_standalone_app_offers_applies_and_routes_hypernetworks(tiny_checkpoints, tmp_path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_training.app.api import build_router
    from lib_training.app.service import StandaloneWorkspace, TrainingService
    from lib_training.methods.hypernetwork import create_hypernetwork
    from lib_training.model.sampler import SampleSettings

    service = TrainingService(StandaloneWorkspace(tiny_checkpoints["sd1"], tmp_path / "outputs", device="cpu"))
    create_hypernetwork(HypernetworkConfig(name="hn", widths="128"), tmp_path / "outputs" / "hypernetwork" / "hn")
    assert "<hypernet:hn:1>" in service.usable_names()
    settings = SampleSettings(prompt="<hypernet:hn:0.5> a red ball", steps=2, width=64, height=64)
    _image, used = service.generate(settings)
    assert used == ["hypernet:hn:0.5"]
    app = FastAPI()
    app.include_router(build_router(service))
    with TestClient(app) as client:
        assert "/training/v1/train/hypernetwork" in client.get("/openapi.json").json()["paths"]


def test_two_hypernetworks_chain_in_prompt_order_as_in_a1111(tiny_sd1, tmp_path) -> None:
    """A1111 runs the context through the first loaded hypernetwork, then the next."""
    for name, seed in (("first", 1), ("second", 2)):
        method = _method(widths="128")
        with method.attached(tiny_sd1):
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in method.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            method.save(tmp_path / f"{name}.pt", 1, {})
    files = [ResultFile("hypernetwork", n, tmp_path / f"{n}.pt") for n in ("first", "second")]
    first, second = (HypernetworkMethod.load(f.path, tiny_sd1).modules[128][0] for f in files)
    site = next(s for s in find_kv_sites(tiny_sd1) if s.cross)
    context = torch.randn(1, 77, 128)
    with torch.no_grad(), results_applied(tiny_sd1, ["<hypernet:first> <hypernet:second> x"], files):
        chained = site.to_k(context)
    expected = torch.nn.functional.linear(second(first(context)), site.to_k.weight)
    assert torch.allclose(chained, expected, atol=1e-5)
    assert not torch.allclose(chained, torch.nn.functional.linear(first(second(context)), site.to_k.weight), atol=1e-3)


def test_cli_create_names_every_bad_setting_by_its_flag_at_once(tmp_path, capsys) -> None:
    from lib_training.app.cli import main

    (tmp_path / "taken.pt").write_bytes(b"")
    code = main(["hypernetwork", "create", "--name", "taken", "--out", str(tmp_path), "--widths", "12x",
                 "--layer-structure", "2, 1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "--name:" in err and "already exists" in err
    assert "--layer-structure:" in err and "--widths:" in err
    assert (tmp_path / "taken.pt").read_bytes() == b""
