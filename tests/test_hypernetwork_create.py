"""A1111's Create step for hypernetworks in the app: the Create section of the hypernetwork sub-tab and
POST /training/v1/hypernetwork/create, both through `TrainingService.create` (the CLI's check): the
file lands where results of the kind are looked for, and every bad field is named at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_training.app.api import PREFIX, build_router
from lib_training.app.service import StandaloneWorkspace, TrainingService
from lib_training.app.ui.training_tab import MethodPanel, build_training_tab
from lib_training.formats.hypernetwork_file import read_hypernetwork
from lib_training.methods import registered
from lib_training.methods.hypernetwork import CREATE_FIELDS

HYPERNETWORK = registered()["hypernetwork"]
PROBLEMS = {"name": "a/b", "layer_structure": "2, 1", "activation": "nope", "widths": "12x"}


@pytest.fixture()
def service(tmp_path: Path) -> TrainingService:
    # creating needs no model: the checkpoint is never read
    return TrainingService(StandaloneWorkspace(tmp_path / "unused.safetensors", tmp_path / "outputs", device="cpu"))


@pytest.fixture()
def client(service: TrainingService):
    app = FastAPI()
    app.include_router(build_router(service))
    with TestClient(app) as test_client:
        yield test_client


def _panel(service: TrainingService) -> MethodPanel:
    with gr.Blocks():
        return MethodPanel(service, HYPERNETWORK)


def _values(panel: MethodPanel, settings: dict[str, Any]) -> list[Any]:
    """The Create controls' values as the page sends them (defaults where `settings` has none)."""
    values = [settings.get(c.info.name, c.info.default) for c in panel.create.form.controls]
    return ["" if value is None else value for value in values]


def _info(update: Any) -> str:
    return (update if isinstance(update, dict) else update.__dict__).get("info", "")


def test_the_hypernetwork_sub_tab_has_a_create_section_of_the_create_fields(service) -> None:
    blocks = build_training_tab(service)
    ids = {b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    fields = {f"sdwt-hypernetwork-create-{name.replace('_', '-')}" for name in CREATE_FIELDS}
    assert fields | {"sdwt-hypernetwork-create", "sdwt-hypernetwork-create-button"} <= ids
    assert "sdwt-hypernetwork-create-continue-from" not in ids  # training's, not creating's
    assert not any(i.startswith("sdwt-embedding-create") for i in ids)  # no create step: no section


def test_create_in_the_hypernetwork_tab_writes_the_file_into_the_outputs(service, tmp_path) -> None:
    panel = _panel(service)
    settings = {"name": "made", "widths": "128, 32, 64", "layer_structure": "1, 1.5, 1", "activation": "relu",
                "layer_norm": True, "dropout": "0, 0.3, 0"}  # fmt: skip
    status, *hints = panel.create.create_clicked(*_values(panel, settings))
    path = tmp_path / "outputs" / "hypernetwork" / "made.pt"
    assert str(path) in status and all("⚠" not in _info(h) for h in hints)
    made = read_hypernetwork(path)
    assert list(made.layers) == [128, 32, 64] and made.layer_structure == [1.0, 1.5, 1.0] and made.step == 0
    assert made.activation_func == "relu" and made.is_layer_norm and made.dropout_structure == [0.0, 0.3, 0.0]
    assert [f.name for f in service.result_files()] == ["made"]  # the Generate tab offers it


def test_bad_create_fields_in_the_tab_are_all_named_at_once_and_nothing_is_written(service, tmp_path) -> None:
    panel = _panel(service)
    status, *hints = panel.create.create_clicked(*_values(panel, PROBLEMS))
    marked = {c.info.name for c, h in zip(panel.create.form.controls, hints) if "⚠" in _info(h)}
    assert marked == set(PROBLEMS)
    assert "start and end with 1" in status and "cannot be a file name" in status and "nope" in status
    assert not (tmp_path / "outputs" / "hypernetwork").exists()


def test_the_api_creates_a_hypernetwork_where_the_outputs_are_listed(client, tmp_path) -> None:
    body = {"name": "made", "widths": "128, 32", "layer_structure": "1, 2, 2, 1", "dropout": "default",
            "last_layer_dropout": True, "weight_init": "XavierUniform"}  # fmt: skip
    response = client.post(f"{PREFIX}/hypernetwork/create", json=body)
    assert response.status_code == 201, response.json()
    path = tmp_path / "outputs" / "hypernetwork" / "made.pt"
    assert response.json() == {"kind": "hypernetwork", "name": "made", "result": str(path)}
    made = read_hypernetwork(path)
    assert list(made.layers) == [128, 32] and made.dropout_structure == [0.0, 0.3, 0.3, 0.0]
    assert str(path) in [output["path"] for output in client.get(f"{PREFIX}/outputs").json()]


def test_the_api_names_every_bad_create_field_at_once_before_writing(client, tmp_path) -> None:
    body = {**PROBLEMS, "continue_from": "old.pt", "colour": "blue"}
    response = client.post(f"{PREFIX}/hypernetwork/create", json=body)
    assert response.status_code == 422
    assert set(response.json()["errors"]) == {*PROBLEMS, "continue_from", "colour"}
    assert not (tmp_path / "outputs" / "hypernetwork").exists()


def test_the_api_refuses_to_replace_a_hypernetwork_unless_told_to(client) -> None:
    assert client.post(f"{PREFIX}/hypernetwork/create", json={"name": "made"}).status_code == 201
    again = client.post(f"{PREFIX}/hypernetwork/create", json={"name": "made"})
    assert again.status_code == 422 and "already exists" in again.json()["errors"]["name"]
    assert client.post(f"{PREFIX}/hypernetwork/create", json={"name": "made", "overwrite": True}).status_code == 201


def test_the_create_route_is_published_with_the_create_fields(client) -> None:
    schema = client.get("/openapi.json").json()["paths"][f"{PREFIX}/hypernetwork/create"]["post"]
    body = schema["requestBody"]["content"]["application/json"]["schema"]
    assert list(body["properties"]) == list(CREATE_FIELDS) and body["required"] == ["name"]
    assert f"{PREFIX}/embedding/create" not in client.get("/openapi.json").json()["paths"]


def test_a_layer_structure_too_narrow_for_a_width_is_named_with_it(client) -> None:
    body = {"name": "thin", "widths": "32", "layer_structure": "1, 0.01, 1"}
    response = client.post(f"{PREFIX}/hypernetwork/create", json=body)
    assert response.status_code == 422 and "width 0 for width 32" in response.json()["errors"]["layer_structure"]
