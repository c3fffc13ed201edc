"""A run folder keeps its result next to its logs, or (in a WebUI) in a separate results folder."""

from __future__ import annotations

from lib_training.training.outputs import RunFolder


def test_the_result_is_in_the_run_folder_by_default(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", "cat", ".safetensors")
    assert folder.result == tmp_path / "run" / "cat.safetensors"
    assert folder.checkpoint(5).parent == tmp_path / "run" / "checkpoints"


def test_a_result_dir_takes_the_result_and_nothing_else(tmp_path) -> None:
    folder = RunFolder(tmp_path / "logs" / "cat", "cat", ".safetensors", result_dir=tmp_path / "embeddings")
    folder.prepare()
    assert folder.result == tmp_path / "embeddings" / "cat.safetensors"
    for path in (folder.checkpoint(5), folder.preview(5), folder.loss_csv, folder.config, folder.resume_state):
        assert path.is_relative_to(tmp_path / "logs" / "cat")
    assert (tmp_path / "embeddings").is_dir() and (tmp_path / "logs" / "cat").is_dir()
