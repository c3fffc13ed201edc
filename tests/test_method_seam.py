"""One seam for every method: registering a method is all it needs.

The throwaway method of `throwaway_method.py` (a bias on every cross-attention output) exists only
in the tests; with no other change it gets a CLI subcommand with the common options, an API route
in the OpenAPI schema, results in its own output folder that the Generate path applies by prompt
tag, and it leaves the model's weights and hooks as they were. (Its Training sub-tab is built under
both Gradios in `test_ui_build.py`; publishing in the host stand-ins is in
`hosts/test_webui_method_seam.py`.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import throwaway_method
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from lib_training.app.api import PREFIX, build_router
from lib_training.app.cli import build_parser, main
from lib_training.app.service import StandaloneWorkspace, TrainingService
from lib_training.formats.fingerprint import hooks_snapshot, weights_fingerprint
from lib_training.methods import registered, registered_for
from lib_training.methods.applied import ResultFile, results_applied
from lib_training.model.sampler import SampleSettings, generate


@pytest.fixture()
def xbias():
    with registered_for(throwaway_method.SPEC) as spec:
        yield spec


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a square")
    return folder


def test_a_registered_method_gets_a_cli_subcommand_with_the_common_options(xbias, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "xbias", "--help"])
    text = capsys.readouterr().out
    for flag in ("--ckpt", "--data", "--name", "--out", "--steps", "--size", "--resume", "--device", "--dtype"):
        assert flag in text
    assert "--init-scale" in text  # its own setting, named after the field


def test_train_help_lists_every_registered_method(xbias, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert all(kind in text for kind in registered())


def test_the_cli_trains_a_registered_method_and_leaves_the_model_as_it_was(
    xbias, tiny_checkpoints, tiny_sd1, images, tmp_path
) -> None:
    before = weights_fingerprint(tiny_sd1.modules), hooks_snapshot(tiny_sd1.modules)
    argv = ["train", "xbias", "--ckpt", str(tiny_checkpoints["sd1"]), "--data", str(images), "--name", "b"]
    argv += ["--out", str(tmp_path), "--steps", "3", "--size", "64", "--preview-every", "0", "--save-every", "0"]
    assert main(argv) == 0
    biases = load_file(str(tmp_path / "b.safetensors"))
    assert len(biases) == 16 and all(b.abs().sum() > 0 for b in biases.values())  # SD1: 16 attn2 outputs
    assert (weights_fingerprint(tiny_sd1.modules), hooks_snapshot(tiny_sd1.modules)) == before


def test_a_registered_method_gets_an_api_route_in_the_openapi_schema(xbias, tiny_checkpoints, tmp_path) -> None:
    service = TrainingService(StandaloneWorkspace(tiny_checkpoints["sd1"], tmp_path, device="cpu"))
    app = FastAPI()
    app.include_router(build_router(service))
    schema = TestClient(app).get("/openapi.json").json()
    route = schema["paths"][f"{PREFIX}/train/xbias"]["post"]
    body = route["requestBody"]["content"]["application/json"]["schema"]
    assert "init_scale" in body["properties"]["method"]["properties"]
    assert body["properties"]["loop"]["properties"]["lr"]["default"] == "0.01"  # the method's own default


def test_a_registered_method_has_its_own_output_folder(xbias, tiny_checkpoints, tmp_path) -> None:
    workspace = StandaloneWorkspace(tiny_checkpoints["sd1"], tmp_path)
    assert workspace.result_folders()["xbias"] == tmp_path / "xbias"
    assert workspace.run_folder(xbias, "b") == tmp_path / "xbias" / "b"


def test_a_prompt_tag_applies_a_result_and_everything_comes_off_afterwards(xbias, tiny_sd1, tmp_path) -> None:
    method = xbias.build(throwaway_method.BiasSettings(name="b", init_scale=0.5))
    method.attach(tiny_sd1)
    method.save(tmp_path / "b.safetensors", 1, {})
    method.detach()
    before = weights_fingerprint(tiny_sd1.modules), hooks_snapshot(tiny_sd1.modules)
    settings = SampleSettings(prompt="a square", steps=2, width=64, height=64)
    plain = generate(tiny_sd1, settings)
    files = [ResultFile("xbias", "b", tmp_path / "b.safetensors")]
    with results_applied(tiny_sd1, ["a square <xbias:b:1>"], files) as applied:
        assert applied.prompts == ["a square"] and applied.used == ["xbias:b:1"]
        biased = generate(tiny_sd1, settings, applied.embeddings)
    with results_applied(tiny_sd1, ["a square <xbias:b:0>"], files):
        unbiased = generate(tiny_sd1, settings)
    assert torch.tensor(list(biased.tobytes())).ne(torch.tensor(list(plain.tobytes()))).any()
    assert unbiased.tobytes() == plain.tobytes()  # strength 0 is no change
    assert (weights_fingerprint(tiny_sd1.modules), hooks_snapshot(tiny_sd1.modules)) == before
