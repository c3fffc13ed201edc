"""Aesthetic gradients in the app: the API route that makes an embedding, the service's generation
with one, and the Generate panel's accordion."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from aesthetic_support import picture_folder, tiny_clip
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_training.aesthetic.embedding_file import load_embedding
from lib_training.aesthetic.personalise import AestheticSettings
from lib_training.app.aesthetic_service import AestheticRequest
from lib_training.app.api import PREFIX, build_router
from lib_training.app.service import StandaloneWorkspace, TrainingService
from lib_training.app.ui.aesthetic_panel import AestheticPanel
from lib_training.app.ui.generate_tab import build_generate_tab
from lib_training.model.sampler import SampleSettings


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory):
    return tiny_clip(tmp_path_factory.mktemp("clip"), text_width=128)


@pytest.fixture()
def service(tiny_checkpoints, tmp_path: Path) -> TrainingService:
    return TrainingService(StandaloneWorkspace(tiny_checkpoints["sd1"], tmp_path / "outputs", device="cpu"))


@pytest.fixture()
def client(service):
    app = FastAPI()
    app.include_router(build_router(service))
    with TestClient(app) as test_client:
        yield test_client


def _create_body(pictures: Path, clip, **more) -> dict:
    return {"data": str(pictures), "name": "style", "clip_model": clip.model, "clip_weights": str(clip.weights),
            "device": "cpu", **more}  # fmt: skip


def test_the_api_makes_an_embedding_as_a_job_into_the_aesthetic_folder(client, service, clip, tmp_path) -> None:
    response = client.post(f"{PREFIX}/aesthetic/create", json=_create_body(picture_folder(tmp_path / "p"), clip))
    assert response.status_code == 202, response.json()
    job = service.jobs.wait(response.json()["id"], timeout=120)
    assert job.state == "finished", job.error
    path = Path(job.result["result"])
    assert path == tmp_path / "outputs" / "aesthetic" / "style.pt"
    assert load_embedding(path).width == 32 and job.result["images"] == 5
    assert service.aesthetic.names() == ["style"]


def test_the_api_names_each_bad_field_before_any_work(client, tmp_path) -> None:
    body = {"data": str(tmp_path / "missing"), "name": "a/b", "clip_weights": str(tmp_path / "none.bin")}
    response = client.post(f"{PREFIX}/aesthetic/create", json=body)
    assert response.status_code == 422
    assert set(response.json()["errors"]) == {"data", "name", "clip_weights"}
    assert "/training/v1/aesthetic/create" in client.get("/openapi.json").json()["paths"]


def test_generation_applies_the_embedding_and_reuses_its_conditioning(service, clip, tmp_path) -> None:
    from lib_training.aesthetic.create import create_embedding

    create_embedding(picture_folder(tmp_path / "p"), "style", tmp_path / "outputs" / "aesthetic", clip)
    settings = SampleSettings("a red ball", steps=1, width=64, height=64)
    request = AestheticRequest(["style"], AestheticSettings(steps=2, lr=1e-3), clip)
    plain, used_plain = service.generate(settings)
    styled, used = service.generate(settings, aesthetic=request)
    again, _ = service.generate(settings, aesthetic=request)
    assert used_plain == [] and used == ["aesthetic style"]
    assert styled.tobytes() != plain.tobytes() and again.tobytes() == styled.tobytes()
    assert service.aesthetic.personalisers.for_model(service.workspace.model(), clip).optimisations == 2


def test_the_generate_panel_has_the_extensions_controls_with_its_defaults(service) -> None:
    blocks = build_generate_tab(service)
    labels = {b.label: b for b in blocks.blocks.values() if getattr(b, "label", None)}
    assert labels["Aesthetic weight"].value == 0.9 and labels["Aesthetic steps"].value == 5
    assert labels["Aesthetic learning rate"].value == "0.0001" and labels["Slerp angle"].value == 0.1
    assert labels["Slerp interpolation"].value is False and labels["Is negative text"].value is False
    assert isinstance(labels["Aesthetic imgs embedding"], gr.Dropdown)
    assert any(isinstance(b, gr.Accordion) and b.label == "Aesthetic gradients" for b in blocks.blocks.values())


def test_the_panel_values_become_a_request_and_none_means_off() -> None:
    assert AestheticPanel.request("None", 0.9, 5, "0.0001", False, "", 0.1, False, "") is None
    request = AestheticPanel.request("style", 0.5, 3, "0.001", True, "blue", 0.2, True, "/w.safetensors")
    assert request.embeddings == ["style"] and request.clip.weights == Path("/w.safetensors")
    assert request.settings == AestheticSettings(0.5, 3, 0.001, True, 0.2, "blue", True)
