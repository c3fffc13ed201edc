"""The extension as the WebUIs load it: `scripts/sd_webui_training.py` registers tabs, settings and
API routes; `install.py` installs only what the WebUI lacks."""

from __future__ import annotations

import importlib.util
import re
import runpy
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_training.app.api import PREFIX
from lib_training.hosts import extension, settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "sd_webui_training.py"


def load_script(webui) -> None:
    """As the WebUIs' `script_loading.load_module`: a module named after the file, not put in sys.modules."""
    spec = importlib.util.spec_from_file_location(SCRIPT.name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def test_script_registers_its_callbacks_once_each(webui) -> None:
    load_script(webui)
    callbacks = webui.module("modules.script_callbacks").callback_map
    registered = {category: len(entries) for category, entries in callbacks.items() if entries}
    assert registered == {
        "callbacks_ui_tabs": 1,
        "callbacks_ui_settings": 1,
        "callbacks_app_started": 1,
        "callbacks_script_unloaded": 1,
    }


def test_the_training_and_merge_tabs_are_built_for_the_webui(webui) -> None:
    load_script(webui)
    tabs = webui.module("modules.script_callbacks").ui_tabs_callback()
    assert [(title, elem_id) for _, title, elem_id in tabs] == [
        ("Training", "sd_webui_training"),
        ("Merge", "sd_webui_training_merge"),
    ]
    assert all(type(blocks).__name__ == "Blocks" for blocks, _, _ in tabs)


def test_the_webuis_training_tab_has_the_aesthetic_embedding_sub_tab(webui) -> None:
    load_script(webui)
    (training, _, _), *_ = webui.module("modules.script_callbacks").ui_tabs_callback()
    tabs = {b.elem_id: b for b in training.blocks.values() if type(b).__name__ in ("Tab", "TabItem")}
    assert tabs["sdwt-aesthetic-tab"].label == "Aesthetic embedding"
    intro = next(b for b in training.blocks.values() if getattr(b, "elem_id", None) == "sdwt-aesthetic-intro")
    assert "aesthetic_embeddings" in intro.value


def test_settings_section_defaults_to_the_webui_folders(webui) -> None:
    load_script(webui)
    webui.module("modules.script_callbacks").ui_settings_callback()
    shared = webui.shared
    ours = {k: v for k, v in shared.opts.data_labels.items() if k.startswith("sd_webui_training_")}
    assert set(ours) == {
        settings.EMBEDDINGS_DIR,
        settings.HYPERNETWORKS_DIR,
        settings.LORA_DIR,
        settings.LOG_DIR,
        settings.SDPA_ATTENTION,
        settings.VERIFY_MODEL,
    }
    assert {info.section for info in ours.values()} == {settings.SECTION}
    assert settings.folder(settings.EMBEDDINGS_DIR) == Path(shared.cmd_opts.embeddings_dir)
    assert settings.folder(settings.HYPERNETWORKS_DIR) == Path(shared.cmd_opts.hypernetwork_dir)
    assert settings.folder(settings.LORA_DIR) == Path(shared.cmd_opts.lora_dir)
    assert settings.folder(settings.LOG_DIR) == webui.data / "textual_inversion"
    shared.opts.data[settings.EMBEDDINGS_DIR] = str(webui.data / "elsewhere")
    assert settings.folder(settings.EMBEDDINGS_DIR) == webui.data / "elsewhere"


def test_api_routes_are_added_to_the_webui_app_also_without_a_ui(webui) -> None:
    load_script(webui)
    app = FastAPI()
    webui.module("modules.script_callbacks").app_started_callback(None, app)  # --nowebui passes no Blocks
    with TestClient(app) as client:
        assert client.get(f"{PREFIX}/methods").status_code == 200
        assert client.get(f"{PREFIX}/jobs/current").status_code == 404


def test_reloading_the_ui_keeps_one_service_and_adds_the_routes_to_the_new_app(webui) -> None:
    callbacks = webui.module("modules.script_callbacks")
    load_script(webui)
    first = extension.service()
    callbacks.script_unloaded_callback()
    callbacks.clear_callbacks()  # what "Reload UI" does before importing the scripts again
    load_script(webui)
    app = FastAPI()
    callbacks.app_started_callback(None, app)
    assert extension.service() is first
    with TestClient(app) as client:
        assert client.get(f"{PREFIX}/methods").status_code == 200


def test_the_webuis_terminal_shows_each_jobs_start_end_and_the_traceback_of_a_failure(webui, capsys) -> None:
    load_script(webui)
    jobs = extension.service().jobs
    assert jobs.wait(jobs.start("test", "Fine job", lambda context: {}).id, 10).state == "finished"

    def broken(context):
        raise ZeroDivisionError("a bug")

    assert jobs.wait(jobs.start("test", "Broken job", broken).id, 10).state == "failed"
    terminal = capsys.readouterr().err
    assert re.search(r"sd-webui-training: job \w+ started: Fine job", terminal), terminal
    assert re.search(r"job \w+ finished after [\d.]+ s: Fine job", terminal), terminal
    assert re.search(r"job \w+ \(Broken job\) failed with an unexpected error\nTraceback", terminal), terminal
    assert "ZeroDivisionError: a bug" in terminal


def test_the_adapter_matches_the_webui(webui) -> None:
    assert type(extension.make_host()).__name__ == {"a1111": "A1111Host", "forge": "ForgeHost"}[webui.kind]


@pytest.mark.parametrize("missing", [set(), {"einops"}, {"open_clip", "safetensors"}])
def test_install_py_installs_only_what_the_webui_lacks(a1111, missing) -> None:
    launch = a1111.module("launch")
    launch.missing = set(missing)
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    installed = [command for command, _ in launch.pip_calls]
    assert len(installed) == len(missing)
    packages = {"einops": "einops", "open_clip": "open_clip_torch", "safetensors": "safetensors"}
    assert all(any(packages[m] in command for command in installed) for m in missing)
    names = {re.split(r"[<>=~! ]", command.split()[1])[0] for command in installed}
    assert not names & {"torch", "torchvision", "gradio"}
