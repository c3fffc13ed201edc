"""DoRA files in the hook and the merge tools: baking one gives what the hook gives at that strength,
resizing keeps dora_scale, a magnitude per output channel (LyCORIS' wd_on_out) applies as ComfyUI applies it,
and a dora_scale that fits neither layout is named."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from lora_support import randomise, small_lora
from safetensors.torch import load_file, save_file

from lib_training.app.api import PREFIX, build_router
from lib_training.app.merge_service import file_roles
from lib_training.app.service import StandaloneWorkspace, TrainingService
from lib_training.errors import CheckpointError
from lib_training.merge import LoraBakeConfig, LoraResizeConfig, LoraSpec, bake_loras, resize_lora
from lib_training.merge.cli import add_merge_parsers
from lib_training.merge.dora import dora_change, input_norm
from lib_training.merge.lora_file import read_lora
from lib_training.methods.lora import LoraMethod
from lib_training.methods.lora.network import weight_of
from lib_training.methods.lora.targets import as_target, attentions_by_out_proj, model_layers, names_of
from lib_training.model.standalone import load_model

QKV = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # SD2: rows of open_clip's fused in_proj_weight


def text_and_unet_outputs(model, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's conditioning of two prompts and the UNet's prediction from it."""
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = model.encode_prompts(["a red ball", "a blue cube on a table"])
        return cond.context, model.predict(x_t, torch.tensor([100, 700]), cond)


def dora_file(checkpoint: Path, path: Path, seed: int = 0, **settings) -> Path:
    """A DoRA file (fp32) with non-zero updates and magnitudes, as after training, for `checkpoint`."""
    method = small_lora(dora=True, save_dtype="fp32", **settings)
    method.attach(load_model(checkpoint))
    randomise(method, seed)
    method.save(path, 1, {})
    method.detach()
    return path


def bake(checkpoint: Path, out: Path, *specs: LoraSpec) -> Path:
    bake_loras(LoraBakeConfig(model=str(checkpoint), loras=list(specs), out=str(out), dtype="fp32"))
    return out


def assert_same_outputs(found, expected) -> None:
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def sd2_dora(tiny_checkpoints, tmp_path_factory) -> Path:
    """SD2: the text encoder (open_clip's fused q/k/v), the UNet's default set and LoCon's 3x3 convs."""
    folder = tmp_path_factory.mktemp("dora")
    return dora_file(tiny_checkpoints["sd2"], folder / "zqx.safetensors", train_text_encoder=True, locon=True)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_baked_dora_file_gives_the_outputs_of_the_hook_at_its_strength(
    strength, sd2_dora, tiny_checkpoints, tmp_path
) -> None:
    model = load_model(tiny_checkpoints["sd2"])
    before = text_and_unet_outputs(model)
    with LoraMethod.load(sd2_dora, model).apply_for_generation(model, strength):
        hooked = text_and_unet_outputs(model)
    assert not torch.allclose(hooked[0], before[0], atol=1e-3)  # the file changes the text encoder
    assert not torch.allclose(hooked[1], before[1], atol=1e-3)  # and the UNet
    baked = bake(tiny_checkpoints["sd2"], tmp_path / "baked.safetensors", LoraSpec(str(sd2_dora), strength))
    assert_same_outputs(text_and_unet_outputs(load_model(baked)), hooked)


def test_baked_dora_columns_have_the_norms_of_dora_scale(sd2_dora, tiny_checkpoints, tmp_path) -> None:
    baked = load_file(str(bake(tiny_checkpoints["sd2"], tmp_path / "baked.safetensors", LoraSpec(str(sd2_dora)))))
    module = read_lora(sd2_dora)[0][QKV]
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    q_rows = baked[key][: module.weight_shape[0]]
    torch.testing.assert_close(input_norm(q_rows), module.dora_scale, rtol=1e-5, atol=1e-6)


def test_a_dora_file_baked_with_another_lora_equals_both_hooked_together(sd2_dora, tiny_checkpoints, tmp_path) -> None:
    """Each file's change is taken against the checkpoint's own weights and the changes summed."""
    plain = small_lora(train_text_encoder=True, save_dtype="fp32")
    plain.attach(load_model(tiny_checkpoints["sd2"]))
    randomise(plain, 5)
    plain.save(tmp_path / "plain.safetensors", 1, {})
    plain.detach()
    model = load_model(tiny_checkpoints["sd2"])
    dora, other = LoraMethod.load(sd2_dora, model), LoraMethod.load(tmp_path / "plain.safetensors", model)
    with dora.apply_for_generation(model, 0.7), other.apply_for_generation(model, 0.4):
        hooked = text_and_unet_outputs(model)
    specs = (LoraSpec(str(sd2_dora), 0.7), LoraSpec(str(tmp_path / "plain.safetensors"), 0.4))
    baked = bake(tiny_checkpoints["sd2"], tmp_path / "baked.safetensors", *specs)
    assert_same_outputs(text_and_unet_outputs(load_model(baked)), hooked)


def test_lora_bake_command_bakes_a_dora_file(sd2_dora, tiny_checkpoints, tmp_path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_merge_parsers(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(
        ["lora", "bake", "--model", str(tiny_checkpoints["sd2"]), "--lora", str(sd2_dora), "--strength", "0.5",
         "--dtype", "fp32", "--out", str(out)]
    )  # fmt: skip
    args.run(args)
    expected = bake(tiny_checkpoints["sd2"], tmp_path / "api.safetensors", LoraSpec(str(sd2_dora), 0.5))
    assert load_file(str(out)).keys() == load_file(str(expected)).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(out)).values(), load_file(str(expected)).values()))


def test_the_api_bakes_and_resizes_a_dora_file_as_jobs(sd2_dora, tiny_checkpoints, tmp_path) -> None:
    """The HTTP routes (and the Merge tab, through the same service) run the same bake and resize."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.include_router(
        build_router(TrainingService(StandaloneWorkspace(tiny_checkpoints["sd2"], tmp_path / "outputs", device="cpu")))
    )
    with TestClient(app) as client:

        def run(route: str, body: dict) -> dict:
            job_id = client.post(f"{PREFIX}/{route}", json=body).json()["id"]
            for _ in range(600):
                job = client.get(f"{PREFIX}/jobs/{job_id}").json()
                if job["state"] != "running":
                    assert job["state"] == "finished", job["error"]
                    return job["result"]
                time.sleep(0.1)
            raise AssertionError(f"{route} still running")

        body = {"model": str(tiny_checkpoints["sd2"]), "loras": [{"path": str(sd2_dora), "strength": 0.5}]}
        baked = run("lora/bake", {**body, "out": "baked", "dtype": "fp32"})
        resized = run("lora/resize", {"lora": str(sd2_dora), "out": "small", "rank": 2, "dtype": "fp32"})
    expected = bake(tiny_checkpoints["sd2"], tmp_path / "direct.safetensors", LoraSpec(str(sd2_dora), 0.5))
    found = load_file(baked["result"])
    assert all(torch.equal(found[key], value) for key, value in load_file(str(expected)).items())
    assert any("DoRA modules now have a lower rank" in warning for warning in resized["warnings"])


def test_the_merge_tab_offers_a_dora_file_where_it_takes_loras(sd2_dora) -> None:
    assert file_roles(sd2_dora) == frozenset({"lora"})


# --- resize ------------------------------------------------------------------------------------------------


def test_resizing_a_dora_file_to_its_rank_changes_nothing_it_does(sd2_dora, tiny_checkpoints, tmp_path) -> None:
    out = tmp_path / "same.safetensors"
    result = resize_lora(LoraResizeConfig(lora=str(sd2_dora), out=str(out), rank=4, dtype="fp32"))
    original, resized = read_lora(sd2_dora)[0], read_lora(out)[0]
    assert original.keys() == resized.keys() and not result.warnings
    for name, module in original.items():
        assert torch.equal(resized[name].dora_scale, module.dora_scale), name
        torch.testing.assert_close(resized[name].delta(), module.delta(), rtol=1e-4, atol=1e-6)
    model = load_model(tiny_checkpoints["sd2"])
    with LoraMethod.load(sd2_dora, model).apply_for_generation(model, 1.0):
        expected = text_and_unet_outputs(model)
    with LoraMethod.load(out, model).apply_for_generation(model, 1.0):
        assert_same_outputs(text_and_unet_outputs(model), expected)


def test_resizing_a_dora_file_lower_keeps_dora_scale_and_warns_it_is_approximate(sd2_dora, tmp_path) -> None:
    out = tmp_path / "small.safetensors"
    result = resize_lora(LoraResizeConfig(lora=str(sd2_dora), out=str(out), rank=2, dtype="fp32"))
    original, resized = read_lora(sd2_dora)[0], read_lora(out)[0]
    assert {m.rank for m in resized.values()} == {2}
    assert all(torch.equal(resized[name].dora_scale, m.dora_scale) for name, m in original.items())
    assert any("DoRA modules now have a lower rank" in warning for warning in result.warnings)


# --- a magnitude per output channel (LyCORIS' wd_on_out), read as ComfyUI reads it ------------------------


def comfyui_weight(weight: torch.Tensor, delta: torch.Tensor, d: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI's `weight_decompose` (comfy/weight_adapter/base.py) for a d of W's output count, written out:
    W + s · (d ⊙ (W + ΔW) / (‖W‖ + ε) − W), the norm of W (not W + ΔW) per output row, ε fp32's eps."""
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    calc = (weight + delta) * (d / (norm + torch.finfo(torch.float32).eps))
    return weight + strength * (calc - weight)


@pytest.fixture(scope="module")
def sd2_dora_on_out(tiny_checkpoints, tmp_path_factory) -> Path:
    """The SD2 DoRA file above with each dora_scale per output channel [out, 1(, 1, 1)], as LyCORIS'
    wd_on_out writes it: ‖W‖ per output row, then changed as training changes it."""
    method = small_lora(dora=True, save_dtype="fp32", train_text_encoder=True, locon=True)
    method.attach(load_model(tiny_checkpoints["sd2"]))
    randomise(method, 0)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, module in method.network.lora.items():
            weight = weight_of(method.network.targets[name]).float()
            rows = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))  # [out, 1(, 1, 1)]
            module.dora_scale = torch.nn.Parameter(rows * (1 + 0.1 * torch.rand(rows.shape, generator=generator)))
    path = tmp_path_factory.mktemp("dora-out") / "wdout.safetensors"
    method.save(path, 1, {})
    method.detach()
    return path


def weights_as_comfyui_makes_them(checkpoint: Path, lora: Path, strength: float):
    """The model with every module of `lora` written into its weights by `comfyui_weight`, from the file's
    tensors as they are."""
    model = load_model(checkpoint)
    tensors = load_file(str(lora))
    index, attentions = names_of(model_layers(model)), attentions_by_out_proj(model)
    names = {key.split(".")[0] for key in tensors}
    with torch.no_grad():
        for name in names:
            weight = weight_of(as_target(index[name], attentions))
            up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (tensors[f"{name}.alpha"] / down.shape[0])
            d = tensors[f"{name}.dora_scale"]
            assert d.shape == (weight.shape[0], 1, *[1] * (weight.ndim - 2))  # per output channel
            weight.copy_(comfyui_weight(weight.clone(), delta, d, strength))
    return model


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_a_per_output_dora_file_applies_as_comfyui_computes_it(strength, sd2_dora_on_out, tiny_checkpoints) -> None:
    model = load_model(tiny_checkpoints["sd2"])
    before = text_and_unet_outputs(model)
    with LoraMethod.load(sd2_dora_on_out, model).apply_for_generation(model, strength):
        hooked = text_and_unet_outputs(model)
    assert not torch.allclose(hooked[0], before[0], atol=1e-3)  # the file changes the text encoder
    assert not torch.allclose(hooked[1], before[1], atol=1e-3)  # and the UNet
    expected = weights_as_comfyui_makes_them(tiny_checkpoints["sd2"], sd2_dora_on_out, strength)
    assert_same_outputs(hooked, text_and_unet_outputs(expected))


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_a_baked_per_output_dora_file_gives_the_outputs_of_the_hook(
    strength, sd2_dora_on_out, tiny_checkpoints, tmp_path
) -> None:
    model = load_model(tiny_checkpoints["sd2"])
    with LoraMethod.load(sd2_dora_on_out, model).apply_for_generation(model, strength):
        hooked = text_and_unet_outputs(model)
    spec = LoraSpec(str(sd2_dora_on_out), strength)
    baked = bake(tiny_checkpoints["sd2"], tmp_path / "baked.safetensors", spec)
    assert_same_outputs(text_and_unet_outputs(load_model(baked)), hooked)


def test_resizing_a_per_output_dora_file_keeps_its_magnitudes_and_what_it_does(
    sd2_dora_on_out, tiny_checkpoints, tmp_path
) -> None:
    same, smaller = tmp_path / "same.safetensors", tmp_path / "small.safetensors"
    resize_lora(LoraResizeConfig(lora=str(sd2_dora_on_out), out=str(same), rank=4, dtype="fp32"))
    resize_lora(LoraResizeConfig(lora=str(sd2_dora_on_out), out=str(smaller), rank=2, dtype="fp32"))
    original = load_file(str(sd2_dora_on_out))
    for path in (same, smaller):
        resized = load_file(str(path))
        scales = [key for key in original if key.endswith(".dora_scale")]
        assert scales and all(torch.equal(resized[key], original[key]) for key in scales)
    model = load_model(tiny_checkpoints["sd2"])
    with LoraMethod.load(sd2_dora_on_out, model).apply_for_generation(model, 1.0):
        expected = text_and_unet_outputs(model)
    with LoraMethod.load(same, model).apply_for_generation(model, 1.0):
        assert_same_outputs(text_and_unet_outputs(model), expected)


@pytest.mark.parametrize(
    ("weight_shape", "dora_shape", "per_output"),
    [
        ((6, 6), (1, 6), False),  # out == in: [1, in] is per input
        ((6, 6), (6, 1), True),  # and [out, 1] per output
        ((5, 1, 3, 3), (5, 1, 1, 1), True),  # in == 1: [out, 1] is per output
        ((5, 1, 3, 3), (1, 1, 1, 1), False),
        ((1, 4), (1, 4), True),  # one output channel: ComfyUI takes its per-output formula for any d
        ((1, 4), (1, 1), True),
    ],
)
def test_the_layout_of_dora_scale_is_read_from_its_shape_as_comfyui_reads_it(
    weight_shape, dora_shape, per_output
) -> None:
    generator = torch.Generator().manual_seed(1)
    weight, delta = torch.randn(weight_shape, generator=generator), 0.3 * torch.randn(weight_shape, generator=generator)
    d = 1 + torch.rand(dora_shape, generator=generator)
    if per_output:
        expected = comfyui_weight(weight, delta, d, 0.5) - weight
    else:  # A1111's apply_weight_decompose, the norm of W + ΔW per input channel
        merged = weight + delta
        norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))
        expected = 0.5 * (d * merged / norm - weight)
    torch.testing.assert_close(dora_change(weight, delta, d, 0.5), expected)


# --- a dora_scale that fits neither layout -------------------------------------------------------------------


def with_dora_scale(source: Path, out: Path, shape: tuple[int, ...]) -> Path:
    tensors = load_file(str(source))
    tensors[f"{QKV}.dora_scale"] = torch.ones(shape)
    save_file(tensors, str(out))
    return out


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (128, 2), (128,), (1, 128, 3)])
def test_a_dora_scale_that_fits_neither_layout_is_named_by_every_tool(
    shape, sd2_dora, tiny_checkpoints, tmp_path
) -> None:
    width = read_lora(sd2_dora)[0][QKV].weight_shape
    assert width == (128, 128)  # the tiny SD2 text encoder's q rows, in the message below
    bad = with_dora_scale(sd2_dora, tmp_path / "bad.safetensors", shape)
    out = tmp_path / "out.safetensors"
    message = (
        rf"has a dora_scale of shape {re.escape(str(list(shape)))}, but for its weight \[128, 128\] DoRA's "
        r"magnitude is \[1, 128\] \(one value per input channel.*\) or \[128, 1\] \(one per output channel"
    )
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: module {QKV} {message}"):
        bake(tiny_checkpoints["sd2"], out, LoraSpec(str(bad)))
    with pytest.raises(CheckpointError, match=message):
        resize_lora(LoraResizeConfig(lora=str(bad), out=str(out), rank=2))
    with pytest.raises(CheckpointError, match=message):
        LoraMethod.load(bad, load_model(tiny_checkpoints["sd2"]))
    assert not out.exists()
