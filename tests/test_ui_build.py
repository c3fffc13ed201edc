"""The tabs build from the method configs, and their handlers behave, under Gradio 4.40 and 3.41.2.

CI runs this file twice: with the venv's Gradio 4.40 (Forge, the standalone app) and with Gradio
3.41.2 and A1111's web stack on PYTHONPATH. Nothing here starts a server.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from lib_training.app.aesthetic_service import CreateConfig
from lib_training.app.merge_service import ROLE_FOLDERS, TOOLS, MergeService, field_used
from lib_training.app.service import StandaloneWorkspace, TrainingService
from lib_training.app.ui.aesthetic_tab import AestheticCreatePanel
from lib_training.app.ui.app import build_app, build_blocks
from lib_training.app.ui.compat import GRADIO_MAJOR, choice_values
from lib_training.app.ui.demo import DemoAssets, demo_assets, training_preset, write_shapes
from lib_training.app.ui.form import ERROR_MARK, INVALID_CLASS, SettingsForm, is_slider, range_text
from lib_training.app.ui.generate_tab import build_generate_tab
from lib_training.app.ui.merge_form import visible_fields
from lib_training.app.ui.merge_tab import ToolPanel, build_merge_tab
from lib_training.app.ui.run_view import RunView
from lib_training.app.ui.runs import run_configs
from lib_training.app.ui.training_tab import MethodPanel, build_training_tab
from lib_training.formats.tensor_files import open_tensors
from lib_training.merge import LoraSpec, MergeConfig
from lib_training.merge.blocks import PRESETS
from lib_training.methods import registered
from lib_training.options import describe
from lib_training.training.request import GROUPS, group_settings, parse_request

EMBEDDING = registered()["embedding"]
LORA = registered()["lora"]


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
    tabs = {b.elem_id: b for b in blocks.blocks.values() if isinstance(b, gr.Tab) and "-train-" in b.elem_id}
    assert set(tabs) == {f"sdwt-train-{kind}" for kind in registered()}
    assert [tabs[f"sdwt-train-{kind}"].label for kind in registered()] == [spec.title for spec in registered().values()]


def test_a_registered_method_gets_its_training_sub_tab_with_its_own_settings(service) -> None:
    """The throwaway test method (`throwaway_method.py`) needs nothing but its registration; this
    file runs under Gradio 4.40 and 3.41.2 (.ci/run)."""
    import throwaway_method

    from lib_training.methods import registered_for

    with registered_for(throwaway_method.SPEC):
        blocks = build_training_tab(service)
    tabs = {b.elem_id: b for b in blocks.blocks.values() if isinstance(b, gr.Tab)}
    assert tabs["sdwt-train-xbias"].label == "Cross-attention bias"
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert "sdwt-xbias-method-init-scale" in ids and "sdwt-xbias-start" in ids


def test_form_controls_match_the_settings_described_by_the_method_config(service) -> None:
    with gr.Blocks():
        form = SettingsForm(EMBEDDING)
    by_key = {control.key: control.component for control in form.controls}
    expected = [(g, info) for g in GROUPS for info in describe(*group_settings(EMBEDDING, g))]
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


def _load_functions(blocks: gr.Blocks) -> list[Any]:
    """The functions a page load runs (Gradio 4 keeps the trigger on the function, 3.41 in its config)."""
    if isinstance(blocks.fns, dict):
        return [fn for fn in blocks.fns.values() if any(trigger[1] == "load" for trigger in fn.targets)]
    return [fn for fn, config in zip(blocks.fns, blocks.dependencies) if config.get("trigger") == "load"]


def test_generate_tab_lists_the_results_afresh_on_every_page_load(service, tmp_path) -> None:
    from lib_training.app.ui.generate_tab import results_text

    blocks = build_generate_tab(service)
    names = next(b for b in blocks.blocks.values() if isinstance(b, gr.Markdown))
    loads = [fn for fn in _load_functions(blocks) if names in fn.outputs]
    assert len(loads) == 1
    folder = tmp_path / "outputs" / "embedding" / "late-cat"
    folder.mkdir(parents=True)
    (folder / "late-cat.safetensors").write_bytes(b"")  # trained after the page was built
    assert "`late-cat`" in loads[0].fn() == results_text(service)


def test_the_result_line_names_the_results_used() -> None:
    from lib_training.app.ui.generate_tab import result_note
    from lib_training.model.sampler import SampleSettings

    settings = SampleSettings(prompt="x", width=128, height=128, seed=3)
    note = result_note(settings, 1.25, ["embedding:my-cat", "lora:style:0.8"])
    assert note == "128x128, seed 3, 1.2 s. Results used: embedding my-cat, lora style at 0.8."
    assert "No results used" in result_note(settings, 1.0, [])


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


def test_docs_page_loads_swagger_ui_from_this_server_not_a_cdn(service) -> None:
    import re

    app = build_app(service)
    with TestClient(app) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(source.startswith("/") for source in sources), sources
        assert "cdn" not in page.text
        for source in sources:
            assert client.get(source).status_code == 200, source
        assert "swagger-ui-bundle.js" in page.text


def _takes(function: Any, count: int) -> bool:
    """Whether `function` can be called with `count` positional values (Gradio passes the request,
    event data or progress by their annotation, not as inputs)."""
    positional, required, rest = 0, 0, False
    for parameter in inspect.signature(function).parameters.values():
        if any(name in str(parameter.annotation) for name in ("Request", "EventData", "Progress")):
            continue
        if parameter.kind == parameter.VAR_POSITIONAL:
            rest = True
        elif parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
            required += parameter.default is parameter.empty
    return required <= count and (rest or count <= positional)


def test_every_event_of_the_page_takes_what_it_is_sent(service) -> None:
    blocks = build_blocks(service, presets={"embedding": {"method": {"name": "x"}}})
    functions = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    events = [(fn.fn, len(fn.inputs)) for fn in functions if fn.fn is not None]
    assert len(events) > 20
    assert [(getattr(f, "__qualname__", f), n) for f, n in events if not _takes(f, n)] == []


@pytest.mark.skipif(GRADIO_MAJOR < 4, reason="Gradio 4.40's browser client; 3.41's checks neither")
def test_the_page_lists_each_event_with_one_parameter_per_input_for_its_client(service) -> None:
    blocks = build_blocks(service)
    listed = blocks.get_api_info()["unnamed_endpoints"]
    events = [d for d in blocks.config["dependencies"] if d["backend_fn"]]
    assert events and {str(d["id"]): len(d["inputs"]) for d in events} == {
        number: len(endpoint["parameters"]) for number, endpoint in listed.items()
    }


@pytest.mark.skipif(GRADIO_MAJOR < 4, reason="Gradio 4.40's browser client; 3.41's checks neither")
def test_the_pages_tab_groups_leave_showing_their_first_tab_to_the_browser(service) -> None:
    config = build_blocks(service).get_config_file()
    groups = [c for c in config["components"] if c["type"] == "tabs"]
    assert len(groups) == 3 and all(group["props"]["selected"] is None for group in groups)


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


def test_three_bad_fields_are_all_marked_at_once(service, demo) -> None:
    preset = training_preset(demo)
    panel = _panel(service, preset)
    bad = {
        **preset,
        "loop": {**preset["loop"], "steps": 0, "lr": "abc"},
        "data": {**preset["data"], "path": "/nonexistent/folder"},
    }
    status, _progress, _start, _interrupt, *hints = panel.start_training(*_values(panel.form, bad), False)
    assert "Training › Steps: must be at least 1" in status
    assert "Training › Learning rate: &#x27;abc&#x27; in the learning rate is not a number" in status
    assert "Dataset › Path: The dataset folder /nonexistent/folder does not exist" in status
    marked = {c.key for c, hint in zip(panel.form.controls, hints) if hint["info"].startswith(ERROR_MARK)}
    assert marked == {"loop.steps", "loop.lr", "data.path"}
    if GRADIO_MAJOR >= 4:  # 3.41's updates cannot set classes: the page's script marks the fields there
        assert marked == {c.key for c, hint in zip(panel.form.controls, hints) if INVALID_CLASS in hint["elem_classes"]}
    assert service.jobs.current() is None


def test_the_fields_updates_are_ones_this_gradio_accepts(service, demo) -> None:
    from gradio.blocks import postprocess_update_dict

    panel = _panel(service, training_preset(demo))
    bad = {"loop": {"steps": 0}, "data": {"path": "/nonexistent/folder"}}
    for hints in (panel.form.hint_updates({"loop.steps": "must be at least 1"}), panel.form.fill_updates(bad)):
        for control, hint in zip(panel.form.controls, hints):
            postprocess_update_dict(control.component, dict(hint), postprocess=True)  # as the server does


def test_overwrite_is_off_in_the_demo_preset_and_the_form(service, demo) -> None:
    assert "overwrite" not in training_preset(demo)["method"]
    panel = _panel(service, training_preset(demo))
    overwrite = next(c for c in panel.form.controls if c.key == "method.overwrite")
    assert overwrite.component.value is False


def test_a_field_is_checked_alone_as_it_is_edited(service) -> None:
    panel = _panel(service)
    steps = next(c for c in panel.form.controls if c.key == "loop.steps")
    name = next(c for c in panel.form.controls if c.key == "method.name")
    assert panel.form.field_problem(steps, -3) == "must be at least 1 (got -3)"
    assert panel.form.field_problem(steps, 12) is None
    assert panel.form.field_problem(name, "") == "required"
    lr = next(c for c in panel.form.controls if c.key == "loop.lr")
    assert "not a number" in panel.form.field_problem(lr, "abc")
    path = next(c for c in panel.form.controls if c.key == "data.path")
    assert "does not exist" in panel.form.field_problem(path, "/nonexistent/folder")


def test_dataset_preview_shows_the_count_and_samples_with_prompts(service, demo) -> None:
    preset = training_preset(demo)
    panel = _panel(service, preset)
    status, summary, samples, *_ = panel.preview_dataset(*_values(panel.form, preset))
    count = len(list(Path(preset["data"]["path"]).glob("*.png")))
    assert f"images: {count}" in summary
    assert len(samples) == min(count, 8)  # up to 8 samples
    image, prompt = samples[0]
    assert image.size[0] <= 192 and preset["method"]["name"] in prompt
    assert "sdwt-info" in status


def test_a_run_that_ends_between_two_polls_still_gets_its_buttons_back(service, demo) -> None:
    preset = training_preset(demo, steps=1)
    panel = _panel(service, preset)
    *_, seen = panel.poll({})  # the page polled while idle: Start enabled, Interrupt disabled
    *updates, seen = panel.start_clicked(seen, *_values(panel.form, preset), False)
    assert _update(updates[2])["interactive"] is False
    assert _wait(service).state == "finished"
    _progress, _preview, _loss, _result, start, interrupt, _status, _seen = panel.poll(seen)
    assert start["interactive"] is True and interrupt["interactive"] is False


def test_earlier_runs_are_found_under_the_workspace_runs_root(tmp_path) -> None:
    """A WebUI keeps runs in LOG/DATE/NAME: runs of earlier days are offered too."""
    import json

    from lib_training.app.service import StandaloneWorkspace, TrainingService
    from lib_training.app.ui.runs import run_configs

    class DatedWorkspace(StandaloneWorkspace):
        def run_folder(self, spec, name):
            return self.root / "log" / "2026-11-21" / name

        def runs_root(self, spec):
            return self.root / "log"

    workspace = DatedWorkspace(tmp_path / "model.safetensors", tmp_path / "out")
    old = workspace.root / "log" / "2026-11-20" / "cat" / "config.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"method": {"kind": "embedding", "name": "cat"}}))
    assert run_configs(TrainingService(workspace), EMBEDDING) == [old.resolve()]


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
    from lib_training.app.jobs import Job
    from lib_training.training.progress import Progress

    job = Job("j1", "train/embedding", "Textual inversion: x", {"method": {"name": "x"}})
    job.progress = Progress("training", 12, 40, loss=0.1234, lr=0.005, steps_per_second=2.5, eta_seconds=11.2)
    text = RunView(service, EMBEDDING, "poll").progress_html(job, None, "running")
    for part in ("step 12/40", "2.50 it/s", "ETA 0:11", "loss 0.1234", "width: 30.0%", 'data-sdwt-poll="poll"'):
        assert part in text


def test_latent_caching_and_training_are_shown_as_phases_each_with_its_own_bar(service) -> None:
    from lib_training.app.jobs import Job
    from lib_training.training.progress import Progress

    view = RunView(service, EMBEDDING, "poll")
    job = Job("j1", "train/embedding", "Textual inversion: x", {"method": {"name": "x"}})
    job.progress = Progress("caching latents", 5, 6)
    caching = view.progress_html(job, None, "running")
    assert "Caching latents · 5/6 images" in caching and "step" not in caching
    assert 'data-sdwt-phase="caching latents"' in caching and 'data-sdwt-phase-status="now">1. Caching' in caching
    job.progress = Progress("training", 1, 40)
    training = view.progress_html(job, None, "running")
    assert 'data-sdwt-phase="training"' in training and "width: 2.5%" in training
    assert 'data-sdwt-phase-status="done">✓ 1. Caching latents' in training
    assert 'data-sdwt-phase-status="now">2. Training' in training


def test_text_caching_is_a_phase_of_its_own_when_the_run_asks_for_it(service) -> None:
    from lib_training.app.jobs import Job
    from lib_training.training.progress import Progress

    view = RunView(service, LORA, "poll")
    job = Job("j1", "train/lora", "LoRA: x", {"method": {"name": "x"}, "loop": {"cache_text_outputs": True}})
    job.progress = Progress("caching text", 3, 4)
    caching = view.progress_html(job, None, "running")
    assert "Caching text · 3/4 prompts" in caching
    assert 'data-sdwt-phase-status="done">✓ 1. Caching latents' in caching
    assert 'data-sdwt-phase-status="now">2. Caching text' in caching
    job.progress = Progress("training", 1, 40)
    assert 'data-sdwt-phase-status="now">3. Training' in view.progress_html(job, None, "running")


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
    configs = run_configs(service, EMBEDDING)
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
    captions = [image.with_suffix(".txt").read_text().strip() for image in images]
    assert all(caption.split()[0] == ("an" if caption.split()[1][0] in "aeiou" else "a") for caption in captions)
    assert "an orange circle" in captions
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) < 64_000


def test_serve_without_a_model_says_how_to_give_one(capsys) -> None:
    from lib_training.app.cli import main

    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "--ckpt PATH" in error and "--demo" in error


def test_demo_assets_are_made_once_then_reused(demo) -> None:
    made = demo.checkpoint.stat().st_mtime_ns
    again = demo_assets(demo.checkpoint.parents[1])
    assert again == demo and again.checkpoint.stat().st_mtime_ns == made


# --- the Merge tab ------------------------------------------------------------------------------------
def _tool_panel(service: TrainingService, kind: str = "merge") -> ToolPanel:
    with gr.Blocks():
        return ToolPanel(MergeService(service.workspace, service.jobs), TOOLS[kind])


def _tool_values(panel: ToolPanel, settings: dict, rows: list[dict] | None = None) -> list[Any]:
    """Control values as the page would send them (defaults elsewhere), then the rows and their count."""

    def shown(control, given: dict) -> Any:
        value = given.get(control.info.name, control.info.default)
        return "" if value is None and control.info.kind in ("str", "path") else value

    values = [shown(control, settings) for control in panel.form.controls]
    for index, form in enumerate(panel.rows):
        given = rows[index] if rows and index < len(rows) else {}
        values += [shown(control, given) for control in form.controls]
    if panel.rows:
        values.append(len(rows or [{}]))
    return values


def panel_pickers(panel: ToolPanel) -> list[str]:
    """The model pickers' values as the page sends them with a poll (nothing chosen)."""
    return ["" for _ in panel.pickers]


def test_merge_tab_has_one_sub_tab_per_tool(service) -> None:
    blocks = build_merge_tab(service)
    tabs = [b for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert [tab.label for tab in tabs] == ["Checkpoint merge", "LoRA bake", "LoRA extract", "LoRA resize"]
    intro = next(b.value for b in blocks.blocks.values() if isinstance(b, gr.Markdown))
    assert str(service.workspace.root / "merge") in intro and "python -m lib_training merge --help" in intro


@pytest.mark.parametrize("kind", list(TOOLS))
def test_tool_form_controls_match_the_settings_described_by_the_config(service, kind) -> None:
    panel = _tool_panel(service, kind)
    infos = describe(TOOLS[kind].config)
    assert sorted(c.info.name for c in panel.form.controls) == sorted(info.name for info in infos)
    for control in panel.form.controls:
        info, component = control.info, control.component
        assert component.label == info.label and info.help in component.info
        if info.role in ROLE_FOLDERS:
            assert isinstance(component, gr.Dropdown) and component.allow_custom_value
        elif info.role == "blocks":
            assert isinstance(component, gr.Dropdown) and choice_values(component) == list(PRESETS)
        elif info.kind == "bool":
            assert isinstance(component, gr.Checkbox) and component.value == info.default
        elif info.choices is not None:
            assert isinstance(component, gr.Dropdown) and choice_values(component) == list(info.choices)
        elif info.optional:
            assert isinstance(component, gr.Textbox) and component.value == ""  # empty: the default applies
        elif is_slider(info):
            assert isinstance(component, gr.Slider) and (component.minimum, component.maximum) == (info.min, info.max)
        elif info.kind in ("int", "float"):
            assert isinstance(component, gr.Number) and range_text(info) in component.info
        else:
            assert isinstance(component, gr.Textbox)


def test_bake_tab_has_rows_of_lora_settings(service) -> None:
    panel = _tool_panel(service, "lora/bake")
    assert len(panel.rows) == 5
    for form in panel.rows:
        assert [c.info.name for c in form.controls] == [info.name for info in describe(LoraSpec)]
    assert panel.rows[1].controls[0].component.label == "LoRA 2"


def test_fields_are_visible_only_for_the_methods_that_use_them() -> None:
    everything = [info.name for info in describe(MergeConfig)]
    assert visible_fields(MergeConfig, None) == everything
    weighted = visible_fields(MergeConfig, "weighted_sum")
    assert {"a", "b", "alpha", "blocks", "out"} <= set(weighted)
    assert not {"c", "beta", "blocks_beta", "density", "seed"} & set(weighted)
    assert "b" not in visible_fields(MergeConfig, "none")
    assert {"c", "beta", "blocks_beta"} <= set(visible_fields(MergeConfig, "triple_sum"))
    assert {"c", "density", "seed"} <= set(visible_fields(MergeConfig, "dare"))
    assert "seed" not in visible_fields(MergeConfig, "ties")


def test_choosing_a_method_shows_its_fields_and_formula(service) -> None:
    panel = _tool_panel(service)
    initial = {c.info.name: c.component.visible for c in panel.form.controls}
    assert initial["b"] and not initial["c"]
    updates = panel.form.method_updates("add_difference")
    shown = {c.info.name: u["visible"] for c, u in zip(panel.form.controls, updates)}
    assert shown == {c.info.name: field_used(c.info, "add_difference") for c in panel.form.controls}
    method = next(u for c, u in zip(panel.form.controls, updates) if c.info.name == "method")
    assert "A + alpha·(B - C)" in method["info"]
    rows = {
        tuple(i.name for i in infos): u["visible"]
        for (_, infos), u in zip(panel.form.method_rows, updates[len(shown) :])
    }
    assert rows[("density", "seed")] is False  # a row of hidden fields is hidden too: no empty gap
    assert rows[("c",)] is True


def test_model_pickers_offer_the_checkpoints_of_the_model_folders(service, demo) -> None:
    panel = _tool_panel(service)
    a = next(c.component for c in panel.form.controls if c.info.name == "a")
    assert choice_values(a) == [demo.checkpoint.name] and a.value is None  # nothing chosen yet
    vae = next(c.component for c in panel.form.controls if c.info.name == "vae")
    assert choice_values(vae) == []  # the demo folder holds no VAE


def test_a_merge_started_from_the_tab_shows_its_result_and_sha256(service, demo) -> None:
    panel = _tool_panel(service)
    name = demo.checkpoint.name
    values = _tool_values(panel, {"a": name, "b": name, "alpha": 0.25, "blocks": "in_to_out", "out": "tab-merge"})
    status, progress, start, interrupt, *_hints = panel.start_job(*values)
    assert "Started Checkpoint merge: tab-merge.safetensors" in status
    assert _update(start)["interactive"] is False and _update(interrupt)["interactive"] is True
    job = _wait(service)
    assert job.state == "finished", job.error
    assert job.settings["alpha"] == 0.25 and job.settings["blocks"] == "in_to_out"
    progress, result, start, interrupt, status, *_lists, _seen = panel.poll({"running": True}, *panel_pickers(panel))
    assert status["value"] == ""  # "Started ..." is over
    tensors = len(open_tensors(demo.checkpoint).keys())
    assert 'data-sdwt-state="finished"' in progress["value"] and f"{tensors}/{tensors} tensors" in progress["value"]
    path = service.workspace.root / "merge" / "tab-merge.safetensors"
    assert path.is_file() and f'data-sdwt-result="{path}"' in result["value"]
    assert job.result["sha256"] in result["value"]
    assert start["interactive"] is True and interrupt["interactive"] is False


def test_a_merge_that_ends_between_two_polls_still_gets_its_buttons_back(service, demo) -> None:
    panel = _tool_panel(service)
    _, seen = panel.view.poll({})[:2]  # the page polled while idle: Start enabled, Interrupt disabled
    name = demo.checkpoint.name
    *updates, seen = panel.start_clicked(seen, *_tool_values(panel, {"a": name, "method": "none", "out": "quick"}))
    assert _update(updates[2])["interactive"] is False
    assert _wait(service).state == "finished"
    _progress, _result, start, interrupt, *_ = panel.poll(seen, *panel_pickers(panel))
    assert start["interactive"] is True and interrupt["interactive"] is False


def test_a_finished_merge_refreshes_the_model_lists(service, demo) -> None:
    panel = _tool_panel(service)
    name = demo.checkpoint.name
    panel.start_job(*_tool_values(panel, {"a": name, "method": "none", "out": "converted"}))
    _wait(service)
    lists = panel.poll({"running": True}, *panel_pickers(panel))[5:-1]
    a = lists[[c.info.name for c in panel.form.controls if c.info.role in ROLE_FOLDERS].index("a")]
    assert "converted.safetensors" in a["choices"]


def test_invalid_merge_settings_are_shown_at_their_fields_and_nothing_starts(service, demo) -> None:
    panel = _tool_panel(service)
    values = _tool_values(panel, {"a": "", "b": "missing.safetensors", "unet_alpha": "lots", "out": "x"})
    status, progress, start, interrupt, *hints = panel.start_job(*values)
    assert all(set(_update(u)) <= {"__type__"} for u in (progress, start, interrupt))
    assert "Model A: required" in status and "UNet alpha: expected a number" in status
    infos = {c.info.name: hint["info"] for c, hint in zip(panel.form.controls, hints)}
    assert infos["a"].startswith(ERROR_MARK) and infos["unet_alpha"].startswith(ERROR_MARK)
    assert not infos["alpha"].startswith(ERROR_MARK)
    assert service.jobs.current() is None
    values = _tool_values(panel, {"a": demo.checkpoint.name, "b": "missing.safetensors", "out": "x"})
    status, *_ = panel.start_job(*values)
    assert "B: no such file: missing.safetensors" in status


def test_a_field_of_the_merge_form_is_checked_as_it_is_edited(service) -> None:
    panel = _tool_panel(service)
    controls = {c.info.name: c for c in panel.form.controls}
    assert panel.form.field_problem(controls["alpha"], 3.5) == "must be at most 2 (got 3.5)"
    assert panel.form.field_problem(controls["unet_alpha"], "") is None  # empty: alpha applies
    assert panel.check_file(controls["a"], "missing.safetensors") == "no such file: missing.safetensors"


def test_bake_rows_become_the_requests_loras_and_their_problems_find_their_row(service, demo) -> None:
    panel = _tool_panel(service, "lora/bake")
    rows = [
        {"path": "one.safetensors", "strength": 0.5},
        {"path": ""},
        {"path": "three.safetensors", "blocks": "inputs"},
    ]
    body, sent = panel.body(_tool_values(panel, {"model": demo.checkpoint.name, "out": "b"}, rows))
    assert sent == [0, 2]  # the empty row is left out
    assert [(r["path"], r["strength"], r["blocks"]) for r in body["loras"]] == [
        ("one.safetensors", 0.5, ""),
        ("three.safetensors", 1.0, "inputs"),
    ]
    errors = panel.form_keys({"loras.1.path": "no such file: three.safetensors", "out": "x"}, sent)
    assert errors == {"loras.2.path": "no such file: three.safetensors", "out": "x"}
    status, *_ = panel.start_job(*_tool_values(panel, {"model": demo.checkpoint.name, "out": "b"}, rows))
    assert "LoRA 3: no such file: three.safetensors" in status


def test_another_lora_row_is_shown_on_request_up_to_five(service) -> None:
    panel = _tool_panel(service, "lora/bake")
    count, *boxes, add = panel.add_lora_row(1)
    assert count == 2 and [b["visible"] for b in boxes] == [True, True, False, False, False]
    count, *boxes, add = panel.add_lora_row(4)
    assert count == 5 and add["interactive"] is False


def test_merge_panel_says_when_another_job_runs(service, demo) -> None:
    panel = _tool_panel(service)
    training = _panel(service, training_preset(demo, steps=100_000))
    preset = training_preset(demo, steps=100_000)
    training.start_training(*_values(training.form, preset), False)
    try:
        updates, _, _ = panel.view.poll({})
        assert "Another job is already running (Textual inversion" in updates[0]["value"]
        assert updates[2]["interactive"] is False  # Start
        name = demo.checkpoint.name
        status, *_ = panel.start_job(*_tool_values(panel, {"a": name, "b": name, "out": "refused"}))
        assert "already running" in status
    finally:
        service.jobs.cancel(service.jobs.current().id)
        _wait(service)


# --- the Aesthetic embedding sub-tab -----------------------------------------------------------------
def _aesthetic_panel(service: TrainingService) -> AestheticCreatePanel:
    with gr.Blocks():
        return AestheticCreatePanel(service.aesthetic)


def _aesthetic_values(panel: AestheticCreatePanel, settings: dict) -> list[Any]:
    values = [settings.get(c.info.name, c.info.default) for c in panel.form.controls]
    return ["" if value is None else value for value in values]


def test_training_tab_ends_with_an_aesthetic_embedding_sub_tab_of_the_create_settings(service) -> None:
    blocks = build_training_tab(service)
    tabs = [b for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs[-1].label == "Aesthetic embedding" and tabs[-1].elem_id == "sdwt-aesthetic-tab"
    ids = {b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    expected = {f"sdwt-aesthetic-{info.name.replace('_', '-')}" for info in describe(CreateConfig)}
    assert expected <= ids and {"sdwt-aesthetic-start", "sdwt-aesthetic-interrupt", "sdwt-aesthetic-poll"} <= ids


def test_bad_aesthetic_settings_are_named_at_their_fields_and_nothing_starts(service, tmp_path) -> None:
    panel = _aesthetic_panel(service)
    values = _aesthetic_values(panel, {"name": "", "data": str(tmp_path / "missing")})
    status, _, start, _, *hints, seen = panel.start_clicked({}, *values)
    assert "Name: required" in status and "Image folder: folder not found" in status
    problems = {c.info.name: _update(h)["info"] for c, h in zip(panel.form.controls, hints)}
    assert "required" in problems["name"] and "folder not found" in problems["data"]
    assert "interactive" not in _update(start)
    assert service.jobs.current() is None and seen == {}


def test_the_aesthetic_tab_says_when_another_job_runs(service, tmp_path) -> None:
    import threading

    from aesthetic_support import picture_folder

    release = threading.Event()
    other = service.jobs.start("other", "Other job", lambda context: release.wait(30) and {})
    try:
        panel = _aesthetic_panel(service)
        values = _aesthetic_values(panel, {"name": "style", "data": str(picture_folder(tmp_path / "p", 1))})
        status = panel.start_clicked({}, *values)[0]
        assert "Other job" in status and service.jobs.current() is other
    finally:
        release.set()
        service.jobs.wait(other.id, 30)


def test_a_valid_aesthetic_request_runs_as_a_job_and_shows_the_embedding_written(service, tmp_path) -> None:
    from aesthetic_support import picture_folder, tiny_clip

    clip = tiny_clip(tmp_path / "clip", text_width=64)
    panel = _aesthetic_panel(service)
    settings = {"name": "style", "data": str(picture_folder(tmp_path / "p", 3)), "clip_model": clip.model,
                "clip_weights": str(clip.weights), "device": "cpu"}  # fmt: skip
    status, *_, seen = panel.start_clicked({}, *_aesthetic_values(panel, settings))
    assert "Started Aesthetic embedding: style" in status and seen["running"]
    assert _wait(service).state == "finished"
    progress, result, start, interrupt, _, seen = panel.poll(seen)
    path = tmp_path / "outputs" / "aesthetic" / "style.pt"
    assert path.is_file() and str(path) in _update(result)["value"] and "3 images" in _update(result)["value"]
    assert "3/3 images" in _update(progress)["value"]
    assert _update(start)["interactive"] is True and _update(interrupt)["interactive"] is False


# --- the hypernetwork sub-tab's Create section ---------------------------------------------------------
HYPERNETWORK = registered()["hypernetwork"]
BAD_HYPERNETWORK = {"name": "a/b", "layer_structure": "2, 1", "activation": "nope", "widths": "12x"}


def _hypernet_panel(service: TrainingService) -> MethodPanel:
    with gr.Blocks():
        return MethodPanel(service, HYPERNETWORK)


def _hypernet_create_values(panel: MethodPanel, settings: dict[str, Any]) -> list[Any]:
    """The Create controls' values as the page sends them (defaults where `settings` has none)."""
    values = [settings.get(c.info.name, c.info.default) for c in panel.create.form.controls]
    return ["" if value is None else value for value in values]


def test_the_hypernetwork_sub_tab_has_a_create_section_of_the_create_fields(service) -> None:
    from lib_training.methods.hypernetwork import CREATE_FIELDS

    blocks = build_training_tab(service)
    ids = {b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    fields = {f"sdwt-hypernetwork-create-{name.replace('_', '-')}" for name in CREATE_FIELDS}
    assert fields | {"sdwt-hypernetwork-create", "sdwt-hypernetwork-create-button"} <= ids
    assert "sdwt-hypernetwork-create-continue-from" not in ids  # training's, not creating's
    assert not any(i.startswith("sdwt-embedding-create") for i in ids)  # no create step: no section


def test_create_in_the_hypernetwork_tab_writes_the_file_into_the_outputs(service, tmp_path) -> None:
    from lib_training.formats.hypernetwork_file import read_hypernetwork

    panel = _hypernet_panel(service)
    settings = {"name": "made", "widths": "128, 32, 64", "layer_structure": "1, 1.5, 1", "activation": "relu",
                "layer_norm": True, "dropout": "0, 0.3, 0"}  # fmt: skip
    status, *hints = panel.create.create_clicked(*_hypernet_create_values(panel, settings))
    path = tmp_path / "outputs" / "hypernetwork" / "made.pt"
    assert str(path) in status and all(ERROR_MARK not in _update(h).get("info", "") for h in hints)
    made = read_hypernetwork(path)
    assert list(made.layers) == [128, 32, 64] and made.layer_structure == [1.0, 1.5, 1.0] and made.step == 0
    assert made.activation_func == "relu" and made.is_layer_norm and made.dropout_structure == [0.0, 0.3, 0.0]
    assert [f.name for f in service.result_files()] == ["made"]  # the Generate tab offers it


def test_bad_hypernetwork_create_fields_are_all_named_at_once_and_nothing_is_written(service, tmp_path) -> None:
    panel = _hypernet_panel(service)
    status, *hints = panel.create.create_clicked(*_hypernet_create_values(panel, BAD_HYPERNETWORK))
    controls = panel.create.form.controls
    marked = {c.info.name for c, h in zip(controls, hints) if ERROR_MARK in _update(h).get("info", "")}
    assert marked == set(BAD_HYPERNETWORK)
    assert "start and end with 1" in status and "cannot be a file name" in status and "nope" in status
    assert not (tmp_path / "outputs" / "hypernetwork").exists()
