"""DoRA files in the merge tools: baking one gives what the hook gives at that strength, resizing keeps
dora_scale, and a dora_scale that does not fit its weight is named."""

from __future__ import annotations

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
from lib_training.merge.dora import input_norm
from lib_training.merge.lora_file import read_lora
from lib_training.methods.lora import LoraMethod
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


# --- a dora_scale that does not fit -------------------------------------------------------------------------


def with_dora_scale(source: Path, out: Path, shape: tuple[int, ...]) -> Path:
    tensors = load_file(str(source))
    tensors[f"{QKV}.dora_scale"] = torch.ones(shape)
    save_file(tensors, str(out))
    return out


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 7), r"\[1, 7\], but for its weight \[128, 128\] DoRA's magnitude is \[1, 128\]"),
        ((128, 1, 1), r"\[128, 1, 1\], a magnitude per output channel \(LyCORIS' wd_on_out\)"),
    ],
)
def test_a_dora_scale_that_does_not_fit_its_weight_is_named_by_every_tool(
    shape, message, sd2_dora, tiny_checkpoints, tmp_path
) -> None:
    width = read_lora(sd2_dora)[0][QKV].weight_shape[1]
    assert width == 128  # the tiny SD2 text encoder's width, in the messages above
    bad = with_dora_scale(sd2_dora, tmp_path / "bad.safetensors", shape)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: module {QKV} has a dora_scale of shape {message}"):
        bake(tiny_checkpoints["sd2"], out, LoraSpec(str(bad)))
    with pytest.raises(CheckpointError, match=message):
        resize_lora(LoraResizeConfig(lora=str(bad), out=str(out), rank=2))
    with pytest.raises(CheckpointError, match=message):
        LoraMethod.load(bad, load_model(tiny_checkpoints["sd2"]))
    assert not out.exists()
