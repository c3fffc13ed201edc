"""A run folder keeps its result next to its logs, or (in a WebUI) in a separate results folder; nothing
of an earlier run is ever deleted, and a run that saved nothing leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_training.dataset import DatasetConfig
from lib_training.methods.embedding import EmbeddingConfig, EmbeddingMethod
from lib_training.training.config import LoopConfig
from lib_training.training.outputs import RunFolder
from lib_training.training.run import train
from lib_training.training.trainer import TrainingError


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


# --- nothing of an earlier run is lost ---------------------------------------------------------------------


def _earlier_run(root: Path) -> None:
    (root / "previews").mkdir(parents=True)
    (root / "previews" / "cat-000010.png").write_bytes(b"preview")
    (root / "loss.csv").write_text("step,loss\n1,0.5\n")
    (root / "cat.safetensors").write_bytes(b"earlier result")
    (root / "latent-cache").mkdir()
    (root / "latent-cache" / "x.safetensors").write_bytes(b"cache")


def test_a_new_run_moves_an_earlier_one_aside_under_a_numbered_name(tmp_path) -> None:
    _earlier_run(tmp_path / "cat")
    (tmp_path / "cat.1").mkdir()  # taken: the next free number is used
    folder = RunFolder(tmp_path / "cat", "cat", ".safetensors")
    folder.begin()
    kept = tmp_path / "cat.2"
    assert folder.archived == kept
    assert (kept / "loss.csv").read_text() == "step,loss\n1,0.5\n"
    assert (kept / "previews" / "cat-000010.png").read_bytes() == b"preview"
    assert (kept / "cat.safetensors").read_bytes() == b"earlier result"
    assert not folder.result.exists()
    assert (tmp_path / "cat" / "latent-cache" / "x.safetensors").exists()  # the cache is reused, not archived
    assert RunFolder.is_archived_result(kept / "cat.safetensors")
    assert not RunFolder.is_archived_result(tmp_path / "cat" / "cat.safetensors")


def test_a_result_kept_elsewhere_is_copied_beside_the_earlier_run(tmp_path) -> None:
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "cat.pt").write_bytes(b"earlier result")
    folder = RunFolder(tmp_path / "logs" / "cat", "cat", ".pt", result_dir=tmp_path / "embeddings")
    folder.begin()
    assert (tmp_path / "logs" / "cat.1" / "cat.pt").read_bytes() == b"earlier result"
    folder.discard()  # nothing saved: all as before
    assert not (tmp_path / "logs" / "cat.1").exists() and not (tmp_path / "logs" / "cat").exists()
    assert (tmp_path / "embeddings" / "cat.pt").read_bytes() == b"earlier result"


def test_discarding_a_run_that_saved_nothing_moves_the_earlier_one_back(tmp_path) -> None:
    _earlier_run(tmp_path / "cat")
    folder = RunFolder(tmp_path / "cat", "cat", ".safetensors")
    folder.begin()
    folder.write_config({"new": True})
    folder.discard()
    assert not (tmp_path / "cat.1").exists()
    assert (tmp_path / "cat" / "cat.safetensors").read_bytes() == b"earlier result"
    assert (tmp_path / "cat" / "latent-cache" / "x.safetensors").exists()
    assert not (tmp_path / "cat" / "config.json").exists()


def test_a_resumed_run_keeps_its_folder(tmp_path) -> None:
    _earlier_run(tmp_path / "cat")
    folder = RunFolder(tmp_path / "cat", "cat", ".safetensors")
    folder.begin(resume=True)
    folder.discard()
    assert folder.archived is None and (tmp_path / "cat" / "loss.csv").exists()


# --- with training ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
    return folder


def _train(model, images: Path, out: Path, steps: int, method=None, **changes):
    method = method or EmbeddingMethod(EmbeddingConfig(name="cat", init_text="cat"))
    loop = LoopConfig(steps=steps, save_every=0, preview_every=0, latent_sampling="mean", **changes)
    return train(model, method, DatasetConfig(path=str(images), size=64, template="subject"), loop, out, overwrite=True)


def test_replacing_a_result_keeps_every_file_of_the_earlier_run(tiny_sd1, images, tmp_path) -> None:
    out = tmp_path / "cat"
    _train(tiny_sd1, images, out, steps=4)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("loss.csv") in before and Path("cat.safetensors") in before
    _train(tiny_sd1, images, out, steps=2)
    after = {p.relative_to(tmp_path / "cat.1"): p.read_bytes() for p in (tmp_path / "cat.1").rglob("*") if p.is_file()}
    assert after == before
    assert (out / "cat.safetensors").exists() and "2," in (out / "loss.csv").read_text()


class _NanEmbedding(EmbeddingMethod):
    def objective(self, step):
        return step.loss * float("nan")


def test_a_nan_stop_leaves_no_folder_and_its_advice_fits_the_device(tiny_sd1, images, tmp_path) -> None:
    out = tmp_path / "cat"
    with pytest.raises(TrainingError) as caught:
        _train(tiny_sd1, images, out, steps=3, method=_NanEmbedding(EmbeddingConfig(name="cat")))
    message = str(caught.value)
    assert "Nothing was saved" in message and "lower the learning rate" in message
    assert "bf16" not in message and "fp16" not in message  # a CPU run in fp32: no precision advice
    assert not out.exists()


def test_a_nan_stop_after_an_earlier_run_restores_it(tiny_sd1, images, tmp_path) -> None:
    out = tmp_path / "cat"
    _train(tiny_sd1, images, out, steps=2)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="earlier run of this name is kept"):
        _train(tiny_sd1, images, out, steps=3, method=_NanEmbedding(EmbeddingConfig(name="cat")))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "cat.1").exists()


def test_a_parameter_that_becomes_inf_stops_the_run(tiny_sd1, images, tmp_path, monkeypatch) -> None:
    step = torch.optim.AdamW.step

    def blow_up(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    with pytest.raises(TrainingError, match="step 1: the loss became nan"):
        _train(tiny_sd1, images, tmp_path / "cat", steps=3)
