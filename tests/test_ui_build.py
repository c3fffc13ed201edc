"""The tabs build from the method configs, and their handlers behave, under Gradio 4.40 and 3.41.2.

CI runs this file twice: with the venv's Gradio 4.40 (Forge, the standalone app) and with Gradio
3.41.2 and A1111's web stack on PYTHONPATH. Nothing here starts a server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from lib_training.options import describe
from lib_training.service import StandaloneWorkspace, TrainingService
from lib_training.training.catalog import GROUPS, METHODS, parse_request
from lib_training.ui.app import build_app
from lib_training.ui.compat import choice_values
from lib_training.ui.demo import DemoAssets, demo_assets, training_preset, write_shapes
from lib_training.ui.form import ERROR_MARK, SettingsForm, is_slider, range_text
from lib_training.ui.generate_tab import build_generate_tab
from lib_training.ui.merge_tab import build_merge_tab
from lib_training.ui.run_view import RunView
from lib_training.ui.runs import run_configs
from lib_training.ui.training_tab import MethodPanel, build_training_tab

EMBEDDING = METHODS["embedding"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return demo_assets(tmp_path_factory.mktemp("cache"))


@pytest.fixture()
def service(demo: DemoAssets, tmp_path: Path) -> TrainingService:
    return TrainingService(StandaloneWorkspace(demo.checkpoint, tmp_path / "outputs", device="cpu"))


def _panel(service: TrainingService, preset: dict | None = None) -> MethodPanel:
    with gr.Blocks():
        return MethodPanel(service, EMBEDDING, preset)


def _values(form: SettingsForm, body: dict) -> list[Any]:
    """Control values as the page would send them for `body` (defaults elsewhere)."""
    values = []
    for control in form.controls:
        value = body.get(control.group, {}).get(control.info.name, control.info.default)
        values.append("" if value is None and control.info.kind in ("str", "path") else value)
    return values


def _update(update: Any) -> dict:
    return update if isinstance(update, dict) else {"value": update}


def _wait(service: TrainingService, timeout: float = 120):
    job = service.jobs.current()
    assert job is not None
    return service.jobs.wait(job.id, timeout)


# --- building ---------------------------------------------------------------------------------------
def test_training_tab_has_one_sub_tab_per_method(service) -> None:
    blocks = build_training_tab(service)
    tabs = {b.elem_id: b for b in blocks.blocks.values() if isinstance(b, gr.Tab)}
    assert set(tabs) == {f"sdwt-train-{kind}" for kind in METHODS}
    assert [tabs[f"sdwt-train-{kind}"].label for kind in METHODS] == [spec.title for spec in METHODS.values()]


def test_form_controls_match_the_settings_described_by_the_method_config(service) -> None:
    with gr.Blocks():
        form = SettingsForm(EMBEDDING)
    by_key = {control.key: control.component for control in form.controls}
    expected = [(g, info) for g in GROUPS for info in describe(*EMBEDDING.group(g))]
    assert sorted(by_key) == sorted(f"{g}.{info.name}" for g, info in expected) and len(by_key) == len(expected)
    for group, info in expected:
        component = by_key[f"{group}.{info.name}"]
        assert component.label == info.label
        assert info.help in component.info
        if not info.required:
            assert component.value == (info.default if info.default is not None else component.value)
        if info.kind == "bool":
            assert isinstance(component, gr.Checkbox)
        elif info.choices is not None:
            assert isinstance(component, gr.Dropdown) and choice_values(component) == list(info.choices)
        elif is_slider(info):
            assert isinstance(component, gr.Slider)
            assert (component.minimum, component.maximum) == (info.min, info.max)
        elif info.kind in ("int", "float"):
            assert isinstance(component, gr.Number)
            assert range_text(info) in component.info  # bounds shown, checked by us rather than refused by Gradio
        else:
            assert isinstance(component, gr.Textbox)


def test_method_default_overrides_show_in_the_form(service) -> None:
    with gr.Blocks():
        form = SettingsForm(EMBEDDING)
    lr = next(c.component for c in form.controls if c.key == "loop.lr")
    assert lr.value == EMBEDDING.loop_defaults["lr"]


def test_advanced_fields_sit_in_a_closed_advanced_accordion(service) -> None:
    with gr.Blocks():
        form = SettingsForm(EMBEDDING)

    def in_advanced(component: Any) -> bool:
        parent = component.parent
        while parent is not None:
            if isinstance(parent, gr.Accordion) and parent.label == "Advanced":
                return not parent.open
            parent = getattr(parent, "parent", None)
        return False

    for control in form.controls:
        assert in_advanced(control.component) == control.info.advanced, control.key


def test_merge_tab_points_to_the_command_line(service) -> None:
    blocks = build_merge_tab(service)
    text = next(b.value for b in blocks.blocks.values() if isinstance(b, gr.Markdown))
    assert "python -m lib_training merge --help" in text


def test_generate_tab_lists_the_embeddings_in_the_outputs(service, tmp_path) -> None:
    folder = tmp_path / "outputs" / "embedding" / "my-cat"
    folder.mkdir(parents=True)
    (folder / "my-cat.safetensors").write_bytes(b"")
    blocks = build_generate_tab(service, {"width": 128})
    texts = [b.value for b in blocks.blocks.values() if isinstance(b, gr.Markdown)]
    assert any("`my-cat`" in text for text in texts)
    width = next(b for b in blocks.blocks.values() if isinstance(b, gr.Slider) and b.label == "Width")
    assert width.value == 128


def test_standalone_app_serves_the_api_beside_the_page(service) -> None:
    app = build_app(service, presets={"embedding": {"method": {"name": "x"}}})
    assert any(type(route).__name__ == "Mount" for route in app.routes)  # the Gradio page
    with TestClient(app) as client:
        assert client.get("/training/v1/methods").json()["embedding"]["title"] == "Textual inversion"
        assert "/training/v1/train/embedding" in client.get("/openapi.json").json()["paths"]


# --- reading the form back ------------------------------------------------------------------------
def test_form_values_become_a_valid_request_body(service, demo) -> None:
    preset = training_preset(demo)
    panel = _panel(service, preset)
    body = panel.form.body(*_values(panel.form, preset))
    request = parse_request(EMBEDDING, body)
    assert request.name == preset["method"]["name"]
    assert request.data.size == preset["data"]["size"]
    assert request.loop.steps == preset["loop"]["steps"] and isinstance(body["loop"]["steps"], int)
    assert body["method"]["continue_from"] is None  # an empty optional path means "none"


def test_invalid_values_are_reported_at_their_fields_and_nothing_starts(service, demo) -> None:
    preset = training_preset(demo)
    panel = _panel(service, preset)
    bad = {**preset, "loop": {**preset["loop"], "steps": 0, "batch_size": 2.5}, "method": {}}
    status, progress, start, interrupt, *hints = panel.start_training(*_values(panel.form, bad), False)
    assert all(set(_update(u)) <= {"__type__"} for u in (progress, start, interrupt))  # the run panel is unchanged
    assert "Training › Steps: must be at least 1" in status
    assert "Training › Batch size: expected a whole number" in status
    assert "Textual inversion › Name: required" in status
    infos = {c.key: hint["info"] for c, hint in zip(panel.form.controls, hints)}
    assert infos["loop.steps"].startswith(ERROR_MARK) and "must be at least 1" in infos["loop.steps"]
    assert not infos["data.repeats"].startswith(ERROR_MARK)
    assert service.jobs.current() is None


def test_a_field_is_checked_alone_as_it_is_edited(service) -> None:
    panel = _panel(service)
    steps = next(c for c in panel.form.controls if c.key == "loop.steps")
    name = next(c for c in panel.form.controls if c.key == "method.name")
    assert panel.form.field_problem(steps, -3) == "must be at least 1 (got -3)"
    assert panel.form.field_problem(steps, 12) is None
    assert panel.form.field_problem(name, "") == "required"


def test_dataset_preview_shows_the_count_and_samples_with_prompts(service, demo) -> None:
    preset = training_preset(demo)
    panel = _panel(service, preset)
    status, summary, samples, *_ = panel.preview_dataset(*_values(panel.form, preset))
    assert "images: 6" in summary
    assert len(samples) == 4
    image, prompt = samples[0]
    assert image.size[0] <= 192 and preset["method"]["name"] in prompt
    assert "sdwt-info" in status


def test_dataset_problems_are_shown_before_training(service, demo, tmp_path) -> None:
    preset = training_preset(demo)
    preset["data"]["path"] = str(tmp_path / "missing")
    panel = _panel(service, preset)
    status, *_ = panel.preview_dataset(*_values(panel.form, preset))
    assert "sdwt-error" in status and "missing" in status


# --- a run seen through the panel -------------------------------------------------------------------
def test_a_finished_run_shows_progress_preview_loss_and_result(service, demo) -> None:
    preset = training_preset(demo, steps=2)
    preset["loop"]["preview_every"] = 1
    panel = _panel(service, preset)
    status, progress, start, interrupt, *_ = panel.start_training(*_values(panel.form, preset), False)
    assert "Started Textual inversion: demo-shape" in status
    assert _update(start)["interactive"] is False and _update(interrupt)["interactive"] is True
    assert _wait(service).state == "finished"

    progress, preview, loss, result, start, interrupt, _status, seen = panel.poll({})
    assert 'data-sdwt-state="finished"' in progress["value"] and "step 2/2" in progress["value"]
    assert preview["value"] is not None and preview["label"] == "Preview at step 2"
    assert loss["value"] is not None
    result_path = Path(service.jobs.current().result["result"])
    assert result_path.is_file() and str(result_path) in result["value"]
    assert start["interactive"] is True and interrupt["interactive"] is False

    again = panel.poll(seen)  # nothing changed: nothing is sent
    assert all(set(_update(u)) <= {"__type__"} for u in again[:-1])


def test_progress_of_a_running_job_shows_step_speed_eta_and_loss(service) -> None:
    from lib_training.jobs import Job
    from lib_training.training.progress import Progress

    job = Job("j1", "train/embedding", "Textual inversion: x", {"method": {"name": "x"}})
    job.progress = Progress("training", 12, 40, loss=0.1234, lr=0.005, steps_per_second=2.5, eta_seconds=11.2)
    text = RunView(service, "embedding", "poll").progress_html(job, None, "running")
    for part in ("step 12/40", "2.50 it/s", "ETA 0:11", "loss 0.1234", "width: 30.0%", 'data-sdwt-poll="poll"'):
        assert part in text


def test_interrupt_stops_the_running_job_which_keeps_its_result(service, demo) -> None:
    preset = training_preset(demo, steps=100_000)
    preset["loop"]["preview_every"] = 0
    panel = _panel(service, preset)
    panel.start_training(*_values(panel.form, preset), False)
    job = service.jobs.current()
    while job.running and (job.progress is None or job.progress.phase != "training"):
        time.sleep(0.05)
    assert "Stopping" in panel.interrupt_training()
    assert _wait(service).state == "interrupted"
    assert Path(job.result["result"]).is_file()


def test_settings_of_a_previous_run_fill_the_form(service, demo) -> None:
    preset = training_preset(demo, steps=1)
    preset["loop"].update(preview_every=0, seed=7)
    preset["method"]["vectors"] = 3
    service.start_training("embedding", preset)
    assert _wait(service).state == "finished"
    configs = run_configs(service, "embedding")
    assert len(configs) == 1 and configs[0].name == "config.json"

    panel = _panel(service)
    status, *updates = panel.load_settings(str(configs[0]))
    assert "Loaded the settings" in status
    filled = {c.key: u["value"] for c, u in zip(panel.form.controls, updates)}
    assert filled["method.vectors"] == 3 and filled["loop.seed"] == 7 and filled["loop.steps"] == 1
    assert filled["data.path"] == str(demo.dataset)


def test_loading_something_that_is_not_a_run_says_so(service, tmp_path) -> None:
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"hello": 1}))
    panel = _panel(service)
    status, *updates = panel.load_settings(str(other))
    assert "is not the config.json of a training run" in status
    assert all(set(_update(u)) <= {"__type__"} for u in updates)


def test_demo_dataset_is_a_few_small_captioned_images(tmp_path) -> None:
    write_shapes(tmp_path)
    images = sorted(tmp_path.glob("*.png"))
    assert len(images) >= 4
    assert all(image.with_suffix(".txt").read_text().startswith("a ") for image in images)
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) < 64_000


def test_serve_without_a_model_says_how_to_give_one(capsys) -> None:
    from lib_training.cli import main

    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "--ckpt PATH" in error and "--demo" in error


def test_demo_assets_are_made_once_then_reused(demo) -> None:
    made = demo.checkpoint.stat().st_mtime_ns
    again = demo_assets(demo.checkpoint.parents[1])
    assert again == demo and again.checkpoint.stat().st_mtime_ns == made
