"""The HTTP API: start, poll, cancel, one job at a time, field-level errors, published schema."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lib_training.api import PREFIX, build_router
from lib_training.embedding_files import read_embedding
from lib_training.service import StandaloneWorkspace, TrainingService


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
