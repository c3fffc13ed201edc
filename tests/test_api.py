"""The HTTP API: start, poll, cancel, one job at a time, field-level errors, published schema;
training and the merge tools alike."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from lib_training.app.api import PREFIX, build_router
from lib_training.app.merge_service import TOOLS
from lib_training.app.service import StandaloneWorkspace, TrainingService
from lib_training.formats.embedding_files import read_embedding
from lib_training.formats.family import Arch
from lib_training.formats.lora_keys import lora_targets
from lib_training.formats.tensor_files import read_safetensors_header
from lib_training.merge import merge
from lib_training.merge.lora_file import LoraModule, lora_tensors


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}-a square.png")
    return folder


@pytest.fixture()
def client(tiny_checkpoints, tmp_path: Path):
    service = TrainingService(StandaloneWorkspace(tiny_checkpoints["sd1"], tmp_path / "outputs", device="cpu"))
    app = FastAPI()
    app.include_router(build_router(service))
    with TestClient(app) as test_client:
        test_client.service = service  # type: ignore[attr-defined]
        yield test_client


def _body(images: Path, steps: int = 3, **loop) -> dict:
    return {
        "method": {"name": "api-test", "init_text": "square"},
        "data": {"path": str(images), "size": 64, "template": "subject"},
        "loop": {"steps": steps, "save_every": 0, "preview_every": 0, **loop},
    }


def _wait(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.get(f"{PREFIX}/jobs/{job_id}").json()
        if state["state"] != "running":
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def test_start_then_poll_until_finished_and_the_output_is_listed(client, images) -> None:
    response = client.post(f"{PREFIX}/train/embedding", json=_body(images))
    assert response.status_code == 202
    job = response.json()
    assert job["state"] == "running" and job["title"] == "Textual inversion: api-test"
    final = _wait(client, job["id"])
    assert final["state"] == "finished", final["error"]
    assert final["progress"]["step"] == 3 and final["result"]["steps"] == 3
    result = Path(final["result"]["result"])
    assert read_embedding(result, expect={"clip_l": 128}).step == 3
    listed = client.get(f"{PREFIX}/outputs").json()
    assert [(o["kind"], o["name"]) for o in listed] == [("embedding", "api-test")]


def test_cancel_stops_the_job_and_keeps_its_result(client, images) -> None:
    job = client.post(f"{PREFIX}/train/embedding", json=_body(images, steps=100_000)).json()
    while (client.get(f"{PREFIX}/jobs/{job['id']}").json()["progress"] or {}).get("phase") != "training":
        time.sleep(0.05)
    assert client.post(f"{PREFIX}/jobs/{job['id']}/cancel").status_code == 200
    final = _wait(client, job["id"])
    assert final["state"] == "interrupted" and final["result"]["interrupted"]
    assert 0 < final["result"]["steps"] < 100_000
    assert Path(final["result"]["result"]).is_file()


def test_second_job_is_refused_with_409_and_the_first_is_unharmed(client, images) -> None:
    first = client.post(f"{PREFIX}/train/embedding", json=_body(images, steps=40)).json()
    second = client.post(f"{PREFIX}/train/embedding", json={**_body(images), "method": {"name": "other"}})
    assert second.status_code == 409
    assert "already running" in second.json()["detail"]
    final = _wait(client, first["id"])
    assert final["state"] == "finished" and final["result"]["steps"] == 40
    assert client.get(f"{PREFIX}/jobs/current").json()["id"] == first["id"]


def test_malformed_settings_are_refused_with_field_level_errors(client, images) -> None:
    body = _body(images, steps="many", optimizer="sgd")
    body["method"] = {"vectors": 500}
    body["data"]["colour"] = "blue"
    response = client.post(f"{PREFIX}/train/embedding", json=body)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert errors["method.name"] == "required"
    assert errors["method.vectors"].startswith("must be at most 75")
    assert errors["loop.steps"].startswith("expected a whole number")
    assert errors["loop.optimizer"].startswith("must be one of adamw")
    assert errors["data.colour"] == "unknown setting"
    assert client.get(f"{PREFIX}/jobs/current").status_code == 404  # nothing was started


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"data": {"path": "/nope"}}, "data.path", "does not exist"),
        ({"loop": {"lr": "abc"}}, "loop.lr", "not a number"),
        ({"data": {"template": "/no/such/template.txt"}}, "data.template", "neither a built-in template"),
    ],
    ids=["path", "lr", "template"],
)
def test_a_bad_path_learning_rate_or_template_is_refused_with_422_before_any_job(
    client, images, change, field, words
) -> None:
    body = _body(images)
    for group, values in change.items():
        body[group].update(values)
    response = client.post(f"{PREFIX}/train/embedding", json=body)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert list(errors) == [field] and words in errors[field]
    assert client.get(f"{PREFIX}/jobs/current").status_code == 404  # nothing was started


def test_a_second_run_of_a_name_needs_overwrite_and_keeps_the_first_run(client, images, tmp_path) -> None:
    first = _wait(client, client.post(f"{PREFIX}/train/embedding", json=_body(images, steps=2)).json()["id"])
    assert first["state"] == "finished", first["error"]
    folder = Path(first["result"]["folder"])
    earlier = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    again = client.post(f"{PREFIX}/train/embedding", json=_body(images, steps=1))
    assert again.status_code == 422 and "already exists" in again.json()["errors"]["method.name"]

    body = _body(images, steps=1)
    body["method"]["overwrite"] = True
    second = _wait(client, client.post(f"{PREFIX}/train/embedding", json=body).json()["id"])
    assert second["state"] == "finished", second["error"]
    kept = folder.with_name(folder.name + ".1")
    assert {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()} == earlier
    listed = client.get(f"{PREFIX}/outputs").json()
    assert [(o["name"], Path(o["path"]).parent) for o in listed] == [("api-test", folder)]  # not the kept one


def test_body_that_is_not_an_object_is_refused(client) -> None:
    response = client.post(f"{PREFIX}/train/embedding", json=[1, 2])
    assert response.status_code == 422


def test_cancel_of_unknown_or_finished_jobs(client, images) -> None:
    assert client.post(f"{PREFIX}/jobs/nope/cancel").status_code == 404
    job = client.post(f"{PREFIX}/train/embedding", json=_body(images, steps=1)).json()
    _wait(client, job["id"])
    assert client.post(f"{PREFIX}/jobs/{job['id']}/cancel").status_code == 409


def test_openapi_schema_describes_the_training_request(client) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"][f"{PREFIX}/train/embedding"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    loop = body["properties"]["loop"]["properties"]
    assert loop["steps"]["type"] == "integer" and loop["steps"]["minimum"] == 1
    assert loop["lr"]["default"] == "0.005"
    assert body["properties"]["method"]["required"] == ["name"]
    assert {"409", "422"} <= set(operation["responses"])
    assert f"{PREFIX}/jobs/{{job_id}}/cancel" in schema["paths"]


def test_methods_lists_textual_inversion(client) -> None:
    methods = client.get(f"{PREFIX}/methods").json()
    assert methods["embedding"]["title"] == "Textual inversion"


# --- merges -----------------------------------------------------------------------------------------
def _data_sha256(path: Path) -> str:
    """sha256 of a safetensors file's data section (what follows the header)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def _random_lora(path: Path, checkpoint: Path, modules: int = 6) -> Path:
    """A kohya LoRA of random rank-2 factors for the first `modules` linear layers of an SD1 checkpoint."""
    shapes = {key: tuple(info["shape"]) for key, info in read_safetensors_header(checkpoint).items() if "shape" in info}
    generator = torch.Generator().manual_seed(0)
    found = {}
    for target in [t for t in lora_targets(shapes, Arch.SD1) if len(t.shape) == 2][:modules]:
        down = torch.randn(2, target.shape[1], generator=generator) * 0.1
        up = torch.randn(target.shape[0], 2, generator=generator) * 0.1
        found[target.name] = LoraModule(target.name, down, up, 2.0)
    save_file(lora_tensors(found, torch.float32), str(path))
    return path


def _gate_merge_at_first_progress(monkeypatch) -> None:
    """Make merges pause once they have written a tensor, until they are cancelled (as a long merge would run)."""

    def paused(config, *, progress, cancel, **more):
        def report(update) -> None:
            progress(update)
            deadline = time.time() + 30
            while update.done_bytes and not cancel() and time.time() < deadline:
                time.sleep(0.01)

        return merge(config, progress=report, cancel=cancel, **more)

    monkeypatch.setitem(TOOLS, "merge", dataclasses.replace(TOOLS["merge"], run=paused))


def _running(client: TestClient, job_id: str) -> dict:
    """The job once it has reported writing data."""
    deadline = time.time() + 30
    while time.time() < deadline:
        state = client.get(f"{PREFIX}/jobs/{job_id}").json()
        if (state["progress"] or {}).get("fraction") or state["state"] != "running":
            return state
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} reported no progress")


def test_a_merge_runs_as_a_job_and_writes_under_the_merge_folder(client, tiny_checkpoints) -> None:
    sd1 = tiny_checkpoints["sd1"]
    response = client.post(f"{PREFIX}/merge", json={"a": str(sd1), "b": sd1.name, "alpha": 0.3, "out": "api-merge"})
    assert response.status_code == 202, response.json()
    job = response.json()
    assert job["kind"] == "merge" and job["title"] == "Checkpoint merge: api-merge.safetensors"
    final = _wait(client, job["id"])
    assert final["state"] == "finished", final["error"]
    result = Path(final["result"]["result"])
    assert result == client.service.workspace.root / "merge" / "api-merge.safetensors"
    assert final["result"]["sha256"] == _data_sha256(result)
    assert final["settings"]["b"] == str(sd1)  # a name in the model folder means that file
    assert final["progress"]["fraction"] == 1.0 and "tensors" in final["progress"]["text"]
    listed = client.get(f"{PREFIX}/outputs").json()
    assert [(o["kind"], o["name"]) for o in listed] == [("merge", "api-merge")]


def test_a_merge_is_refused_with_409_while_a_training_runs(client, images, tiny_checkpoints) -> None:
    training = client.post(f"{PREFIX}/train/embedding", json=_body(images, steps=100_000)).json()
    sd1 = str(tiny_checkpoints["sd1"])
    response = client.post(f"{PREFIX}/merge", json={"a": sd1, "b": sd1, "out": "refused"})
    assert response.status_code == 409 and "already running" in response.json()["detail"]
    client.post(f"{PREFIX}/jobs/{training['id']}/cancel")
    assert _wait(client, training["id"])["state"] == "interrupted"
    assert not (client.service.workspace.root / "merge" / "refused.safetensors").exists()


def test_training_and_other_merges_are_refused_with_409_while_a_merge_runs(
    client, images, tiny_checkpoints, monkeypatch
) -> None:
    _gate_merge_at_first_progress(monkeypatch)
    sd1 = str(tiny_checkpoints["sd1"])
    first = client.post(f"{PREFIX}/merge", json={"a": sd1, "b": sd1, "out": "first"}).json()
    assert _running(client, first["id"])["state"] == "running"
    assert client.post(f"{PREFIX}/train/embedding", json=_body(images)).status_code == 409
    assert client.post(f"{PREFIX}/lora/extract", json={"base": sd1, "tuned": sd1, "out": "x"}).status_code == 409
    client.post(f"{PREFIX}/jobs/{first['id']}/cancel")
    _wait(client, first["id"])


def test_cancel_stops_a_merge_midway_and_leaves_no_file(client, tiny_checkpoints, monkeypatch) -> None:
    _gate_merge_at_first_progress(monkeypatch)
    sd1 = str(tiny_checkpoints["sd1"])
    job = client.post(f"{PREFIX}/merge", json={"a": sd1, "b": sd1, "out": "cancelled"}).json()
    progress = _running(client, job["id"])["progress"]
    assert 0 < progress["fraction"] < 1 and progress["step"] < progress["total"]
    assert client.post(f"{PREFIX}/jobs/{job['id']}/cancel").status_code == 200
    final = _wait(client, job["id"])
    assert final["state"] == "interrupted" and final["result"]["cancelled"]
    folder = client.service.workspace.root / "merge"
    assert list(folder.iterdir()) == []  # neither the output nor its temporary file


def test_malformed_merge_settings_are_refused_with_field_level_errors(client) -> None:
    body = {"method": "average", "alpha": "half", "density": 3, "colour": "blue"}
    response = client.post(f"{PREFIX}/merge", json=body)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert errors["a"] == "required" and errors["out"] == "required"
    assert errors["method"].startswith("must be one of none, weighted_sum")
    assert errors["alpha"].startswith("expected a number")
    assert errors["density"].startswith("must be at most 1")
    assert errors["colour"] == "unknown setting"
    assert client.get(f"{PREFIX}/jobs/current").status_code == 404  # nothing was started


def test_missing_models_and_bad_block_weights_are_named_by_field(client, tiny_checkpoints) -> None:
    sd1 = str(tiny_checkpoints["sd1"])
    body = {"method": "add_difference", "a": sd1, "b": "missing.safetensors", "out": "x"}
    errors = client.post(f"{PREFIX}/merge", json=body).json()["errors"]
    assert errors["b"].startswith("no such file: missing.safetensors (looked in")
    assert errors["c"] == "the add_difference method needs this model"
    errors = client.post(f"{PREFIX}/merge", json={"a": sd1, "b": sd1, "out": "x", "blocks": "1, 0.5"}).json()["errors"]
    assert list(errors) == ["blocks"] and "need 26 comma-separated values" in errors["blocks"]


def test_models_of_different_families_are_refused_before_any_work(client, tiny_checkpoints) -> None:
    body = {"a": str(tiny_checkpoints["sd1"]), "b": str(tiny_checkpoints["sdxl"]), "out": "x"}
    response = client.post(f"{PREFIX}/merge", json=body)
    assert response.status_code == 422
    assert "different families cannot be merged" in response.json()["errors"][""]


def test_lora_bake_extract_and_resize_run_as_jobs(client, tiny_checkpoints, tmp_path) -> None:
    sd1 = tiny_checkpoints["sd1"]
    lora = _random_lora(tmp_path / "style.safetensors", sd1)
    bake = {"model": str(sd1), "loras": [{"path": str(lora), "strength": 0.8}], "out": "baked", "dtype": "fp32"}
    baked = _wait(client, client.post(f"{PREFIX}/lora/bake", json=bake).json()["id"])
    assert baked["state"] == "finished", baked["error"]
    assert baked["result"]["modules"] == 6 and baked["settings"]["loras"][0]["strength"] == 0.8
    extract = {"base": str(sd1), "tuned": baked["result"]["result"], "out": "extracted", "rank": 2}
    extracted = _wait(client, client.post(f"{PREFIX}/lora/extract", json=extract).json()["id"])
    assert extracted["state"] == "finished", extracted["error"]
    assert extracted["result"]["result"].endswith("merge/extracted.safetensors")
    resize = {"lora": extracted["result"]["result"], "out": "resized", "rank": 1}
    resized = _wait(client, client.post(f"{PREFIX}/lora/resize", json=resize).json()["id"])
    assert resized["state"] == "finished", resized["error"]
    assert resized["result"]["sha256"] == _data_sha256(Path(resized["result"]["result"]))


def test_bake_rows_are_checked_one_by_one(client, tiny_checkpoints) -> None:
    body = {"model": str(tiny_checkpoints["sd1"]), "out": "x", "loras": [{"strength": "full"}, 3]}
    errors = client.post(f"{PREFIX}/lora/bake", json=body).json()["errors"]
    assert errors["loras.0.path"] == "required"
    assert errors["loras.0.strength"].startswith("expected a number")
    assert errors["loras.1"].startswith("expected an object")
    errors = client.post(f"{PREFIX}/lora/bake", json={"model": str(tiny_checkpoints["sd1"]), "out": "x"}).json()
    assert errors["errors"]["loras"] == "give at least one of the loras"


def test_openapi_schema_describes_the_merge_requests(client) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"][f"{PREFIX}/merge"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["a", "out"]
    assert "ties" in body["properties"]["method"]["enum"]
    assert body["properties"]["alpha"]["minimum"] == -1.0
    assert {"409", "422"} <= set(operation["responses"])
    bake = schema["paths"][f"{PREFIX}/lora/bake"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    loras = bake["properties"]["loras"]
    assert loras["type"] == "array" and "loras" in bake["required"]
    assert loras["items"]["required"] == ["path"] and loras["items"]["properties"]["strength"]["default"] == 1.0
    assert f"{PREFIX}/lora/extract" in schema["paths"] and f"{PREFIX}/lora/resize" in schema["paths"]


# --- a method's Create step: hypernetworks --------------------------------------------------------------
BAD_HYPERNETWORK = {"name": "a/b", "layer_structure": "2, 1", "activation": "nope", "widths": "12x"}


def test_the_api_creates_a_hypernetwork_where_the_outputs_are_listed(client, tmp_path) -> None:
    from lib_training.formats.hypernetwork_file import read_hypernetwork

    body = {"name": "made", "widths": "128, 32", "layer_structure": "1, 2, 2, 1", "dropout": "default",
            "last_layer_dropout": True, "weight_init": "XavierUniform"}  # fmt: skip
    response = client.post(f"{PREFIX}/hypernetwork/create", json=body)
    assert response.status_code == 201, response.json()
    path = tmp_path / "outputs" / "hypernetwork" / "made.pt"
    assert response.json() == {"kind": "hypernetwork", "name": "made", "result": str(path)}
    made = read_hypernetwork(path)
    assert list(made.layers) == [128, 32] and made.dropout_structure == [0.0, 0.3, 0.3, 0.0]
    assert str(path) in [output["path"] for output in client.get(f"{PREFIX}/outputs").json()]


def test_the_api_names_every_bad_hypernetwork_create_field_at_once_before_writing(client, tmp_path) -> None:
    body = {**BAD_HYPERNETWORK, "continue_from": "old.pt", "colour": "blue"}
    response = client.post(f"{PREFIX}/hypernetwork/create", json=body)
    assert response.status_code == 422
    assert set(response.json()["errors"]) == {*BAD_HYPERNETWORK, "continue_from", "colour"}
    assert not (tmp_path / "outputs" / "hypernetwork").exists()


def test_a_hypernetwork_layer_structure_too_narrow_for_a_width_is_named_with_it(client) -> None:
    body = {"name": "thin", "widths": "32", "layer_structure": "1, 0.01, 1"}
    response = client.post(f"{PREFIX}/hypernetwork/create", json=body)
    assert response.status_code == 422 and "width 0 for width 32" in response.json()["errors"]["layer_structure"]


def test_the_api_refuses_to_replace_a_hypernetwork_unless_told_to(client) -> None:
    assert client.post(f"{PREFIX}/hypernetwork/create", json={"name": "made"}).status_code == 201
    again = client.post(f"{PREFIX}/hypernetwork/create", json={"name": "made"})
    assert again.status_code == 422 and "already exists" in again.json()["errors"]["name"]
    assert client.post(f"{PREFIX}/hypernetwork/create", json={"name": "made", "overwrite": True}).status_code == 201


def test_the_hypernetwork_create_route_is_published_with_the_create_fields(client) -> None:
    from lib_training.methods.hypernetwork import CREATE_FIELDS

    paths = client.get("/openapi.json").json()["paths"]
    body = paths[f"{PREFIX}/hypernetwork/create"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert list(body["properties"]) == list(CREATE_FIELDS) and body["required"] == ["name"]
    assert f"{PREFIX}/embedding/create" not in paths  # a method without a create step has no route
