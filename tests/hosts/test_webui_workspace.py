"""Where a WebUI job's files go, and the model only inside a job's session."""

from __future__ import annotations

import datetime

import pytest

from lib_training.errors import UserError
from lib_training.hosts import extension, settings
from lib_training.methods import registered, spec_for
from lib_training.training.outputs import RunFolder

TODAY = datetime.date(2025, 6, 2)


EMBEDDING = spec_for("embedding")


def workspace(webui):
    from lib_training.hosts.workspace import WebUIWorkspace

    return WebUIWorkspace(extension.make_host(), today=lambda: TODAY)


def test_results_go_to_the_webui_folders_and_logs_to_a_dated_run_folder(a1111) -> None:
    space = workspace(a1111)
    assert space.result_dir(EMBEDDING) == settings.folder(settings.EMBEDDINGS_DIR)
    assert space.run_folder(EMBEDDING, "cat") == a1111.data / "textual_inversion" / "2025-06-02" / "cat"
    roles = {
        "embeddings": settings.EMBEDDINGS_DIR,
        "hypernetworks": settings.HYPERNETWORKS_DIR,
        "loras": settings.LORA_DIR,
    }
    assert space.result_folders() == {
        kind: settings.folder(roles[spec.result_role]) for kind, spec in registered().items()
    }  # each method's results in the WebUI's folder for its role


def test_files_record_the_loaded_checkpoints_hash_and_name(a1111, monkeypatch) -> None:
    from types import SimpleNamespace

    info = SimpleNamespace(shorthash="0123456789", model_name="realistic-v2")
    monkeypatch.setattr(a1111.shared, "sd_model", SimpleNamespace(sd_checkpoint_info=info))
    assert workspace(a1111).model_identity() == {"sd_checkpoint": "0123456789", "sd_checkpoint_name": "realistic-v2"}


def test_a_run_saved_on_an_earlier_day_is_continued_in_its_folder(a1111) -> None:
    space = workspace(a1111)
    logs = a1111.data / "textual_inversion"
    for day in ("2025-05-30", "2025-06-01"):
        (logs / day / "cat").mkdir(parents=True)
        (logs / day / "cat" / RunFolder.RESUME_NAME).write_bytes(b"")
    (logs / "2025-05-31" / "dog").mkdir(parents=True)
    assert space.run_folder(EMBEDDING, "cat") == logs / "2025-06-01" / "cat"
    assert space.run_folder(EMBEDDING, "dog") == logs / "2025-06-02" / "dog"  # nothing saved to continue
    (logs / "2025-06-02" / "cat").mkdir(parents=True)
    assert space.run_folder(EMBEDDING, "cat") == logs / "2025-06-02" / "cat"  # today's run is today's


def test_the_model_exists_only_inside_a_session(a1111, standalone) -> None:
    a1111.load(standalone["sd1"])
    space = workspace(a1111)
    with pytest.raises(UserError):
        space.model()
    with space.session():
        assert space.model().family.name == "sd1"
    with pytest.raises(UserError):
        space.model()


def test_the_model_description_names_the_webui_and_its_checkpoint(webui) -> None:
    assert workspace(webui).describe_model() in (
        "AUTOMATIC1111: tiny.safetensors [0123456789]",
        "Forge: tiny.safetensors [0123456789]",
    )


def test_merge_outputs_are_offered_from_and_refreshed_in_the_webui(a1111) -> None:
    networks = a1111.module("networks")  # the WebUI loaded its Lora extension
    space = workspace(a1111)
    folders = space.model_folders()
    assert folders["checkpoints"] == [a1111.data / "models" / "Stable-diffusion"]
    assert folders["loras"] == [settings.folder(settings.LORA_DIR)]
    space.after_merge("checkpoints", a1111.data / "merged.safetensors")
    space.after_merge("loras", a1111.data / "lora.safetensors")
    assert a1111.module("modules.sd_models").list_calls == 1
    assert networks.list_calls == 1
