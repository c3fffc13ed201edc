"""The merge service: where inputs and outputs are, model files by kind, progress, the workspace hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_training.app.jobs import JobManager
from lib_training.app.merge_service import TOOLS, MergeService, field_used, file_roles, job_progress
from lib_training.app.service import StandaloneWorkspace, Workspace
from lib_training.errors import ConfigError
from lib_training.merge import MergeConfig
from lib_training.merge import WriteProgress as FileProgress
from lib_training.options import SettingsError, describe


class RecordingWorkspace(StandaloneWorkspace):
    """The standalone workspace, noting what `after_merge` is told."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.merged: list[tuple[str, Path]] = []

    def after_merge(self, kind: str, result: Path) -> None:
        self.merged.append((kind, result))


class BareWorkspace(Workspace):
    """A workspace that implements only what it must: no model folders."""

    def model(self):
        raise NotImplementedError

    def run_folder(self, kind: str, name: str) -> Path:
        raise NotImplementedError

    def result_folders(self) -> dict[str, Path]:
        return {}


@pytest.fixture()
def models(tmp_path: Path, tiny_checkpoints) -> Path:
    """A model folder: a checkpoint (in a subfolder), a LoRA, a VAE, an embedding and a pickled VAE."""
    folder = tmp_path / "models"
    (folder / "sd").mkdir(parents=True)
    (folder / "sd" / "base.safetensors").write_bytes(tiny_checkpoints["sd1"].read_bytes())
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(folder / "style.safetensors"))
    save_file(
        {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)},
        str(folder / "v.safetensors"),
    )
    save_file({"emb_params": torch.zeros(1, 8)}, str(folder / "token.safetensors"))
    (folder / "old-vae.pt").write_bytes(b"")
    (folder / ".hidden.safetensors").write_bytes(b"")
    return folder


@pytest.fixture()
def merges(models: Path, tmp_path: Path) -> MergeService:
    return MergeService(RecordingWorkspace(models / "sd" / "base.safetensors", tmp_path / "out"), JobManager())


def test_standalone_workspace_offers_the_checkpoint_folder_and_writes_to_out_merge(tmp_path: Path) -> None:
    workspace = StandaloneWorkspace(tmp_path / "models" / "m.safetensors", tmp_path / "out")
    folders = workspace.model_folders()
    assert folders["checkpoints"] == [tmp_path / "models", tmp_path / "out" / "merge"]
    assert folders["vaes"] == [tmp_path / "models"]
    assert workspace.merge_output_folder("loras") == tmp_path / "out" / "merge"
    assert workspace.result_folders()["merge"] == tmp_path / "out" / "merge"


def test_files_are_offered_by_what_their_keys_say_they_are(merges: MergeService, models: Path) -> None:
    merges.workspace.model_folders = lambda: {"checkpoints": [models], "loras": [models], "vaes": [models]}
    assert merges.model_files("model") == ["sd/base.safetensors"]
    assert merges.model_files("lora") == ["style.safetensors"]
    assert merges.model_files("vae") == ["old-vae.pt", "v.safetensors"]
    assert file_roles(models / "token.safetensors") == frozenset()


def test_a_name_shadowed_by_an_earlier_folder_is_listed_by_its_full_path(merges: MergeService, tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for folder in (first, second):
        folder.mkdir()
        save_file({"lora_te_y.lora_down.weight": torch.zeros(2, 4)}, str(folder / "same.safetensors"))
    merges.workspace.model_folders = lambda: {"loras": [first, second]}
    assert merges.model_files("lora") == [str(second / "same.safetensors"), "same.safetensors"]
    assert merges.resolve_input("lora", "same.safetensors") == str(first / "same.safetensors")


def test_relative_input_names_are_found_in_the_model_folders(merges: MergeService, models: Path) -> None:
    assert merges.resolve_input("model", "base.safetensors") == str(models / "sd" / "base.safetensors")
    assert merges.resolve_input("model", str(models / "v.safetensors")) == str(models / "v.safetensors")
    assert merges.resolve_input("model", "nowhere.safetensors") == "nowhere.safetensors"


def test_output_names_go_to_the_merge_folder_with_the_extension_added(merges: MergeService, tmp_path: Path) -> None:
    spec = TOOLS["merge"]
    assert merges.resolve_output(spec, "mix-v1.5") == str(tmp_path / "out" / "merge" / "mix-v1.5.safetensors")
    assert merges.resolve_output(spec, "sub/x.safetensors") == str(tmp_path / "out" / "merge" / "sub" / "x.safetensors")
    assert merges.resolve_output(spec, str(tmp_path / "abs.safetensors")) == str(tmp_path / "abs.safetensors")


def test_an_existing_output_is_refused_at_its_field_unless_overwriting(merges: MergeService, tmp_path: Path) -> None:
    (tmp_path / "out" / "merge").mkdir(parents=True)
    (tmp_path / "out" / "merge" / "taken.safetensors").write_bytes(b"")
    body = {"a": "base.safetensors", "method": "none", "out": "taken"}
    assert merges.errors("merge", body)["out"].endswith("exists: choose another name, or allow overwriting")
    assert merges.errors("merge", {**body, "overwrite": True}) == {}


def test_without_model_folders_a_relative_output_is_refused(tiny_checkpoints) -> None:
    bare = MergeService(BareWorkspace(), JobManager())
    body = {"a": str(tiny_checkpoints["sd1"]), "method": "none", "out": "relative"}
    assert "give the output as an absolute path" in bare.errors("merge", body)["out"]
    assert bare.model_files("model") == []


def test_a_finished_merge_is_announced_to_the_workspace(merges: MergeService) -> None:
    job = merges.start("merge", {"a": "base.safetensors", "method": "none", "out": "converted"})
    assert merges.jobs.wait(job.id, 60).state == "finished", job.error
    assert merges.workspace.merged == [("checkpoints", Path(job.result["result"]))]
    assert [j.id for j in merges.results("merge")] == [job.id]


def test_parse_returns_the_config_with_resolved_paths(merges: MergeService, models: Path) -> None:
    config = merges.parse("merge", {"a": "base.safetensors", "b": "base.safetensors", "out": "m"})
    assert isinstance(config, MergeConfig)
    assert config.a == config.b == str(models / "sd" / "base.safetensors")
    with pytest.raises(SettingsError) as raised:
        merges.parse("merge", [])
    assert raised.value.errors == {"": "expected a JSON object of settings, got list"}


def test_unknown_tool_is_a_config_error(merges: MergeService) -> None:
    with pytest.raises(ConfigError, match="unknown merge tool"):
        merges.start("lora/shrink", {})


def test_job_progress_counts_tensors_and_measures_by_bytes() -> None:
    report = FileProgress(
        done_bytes=10**6, total_bytes=4 * 10**6, done_tensors=30, total_tensors=40, elapsed=2.0, eta=6.0, key="k"
    )
    progress = job_progress(TOOLS["merge"], report)
    assert (progress.phase, progress.step, progress.total) == ("merging", 30, 40)
    assert progress.fraction == 0.25  # bytes, not tensors: big and small tensors alternate
    assert progress.describe() == "merging 30/40 tensors, 1 MB of 4 MB written, ETA 0:06"
    assert job_progress(TOOLS["lora/extract"], report).describe() == "extracting 30/40 modules, ETA 0:06"


def test_fields_apply_to_the_methods_named_in_their_used_by() -> None:
    infos = {info.name: info for info in describe(MergeConfig)}
    assert field_used(infos["c"], "add_difference") and not field_used(infos["c"], "weighted_sum")
    assert field_used(infos["alpha"], "none")  # no used_by: every method
    assert field_used(infos["c"], None)  # no method chosen: shown


def test_an_empty_merge_form_names_model_b_with_the_other_missing_fields(merges) -> None:
    errors = merges.errors("merge", {})
    assert set(errors) == {"a", "b", "out"}
    assert errors["b"] == "the weighted_sum method needs this model"
    assert set(merges.errors("merge", {"method": "add_difference"})) == {"a", "b", "c", "out"}
