"""Textual inversion on the tiny models: it learns, resumes exactly, saves WebUI files, leaves the model alone."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from learning import fixed_eval_loss, random_like
from PIL import Image, ImageDraw

from lib_training.dataset import DatasetConfig
from lib_training.errors import ConfigError, UserError
from lib_training.formats.embedding_files import EmbeddingFile, read_embedding, write_embedding
from lib_training.formats.fingerprint import hooks_snapshot, requires_grad_snapshot, weights_fingerprint
from lib_training.formats.tensor_files import open_tensors
from lib_training.methods.embedding import EmbeddingConfig, EmbeddingMethod, initial_vectors
from lib_training.model.standalone import load_model
from lib_training.training.config import LoopConfig
from lib_training.training.run import train
from lib_training.training.trainer import TrainingError

FAST = LoopConfig(steps=10, save_every=0, preview_every=0, latent_sampling="mean")


def _image(path: Path, background: tuple[int, int, int], seed: int) -> None:
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    offset = 8 + 4 * seed
    draw.ellipse((offset, offset, offset + 36, offset + 36), fill=(240, 40, 30))
    image.save(path)


@pytest.fixture(scope="module")
def red_ball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("red-ball")
    for i, background in enumerate([(20, 120, 200), (30, 160, 60), (200, 200, 40)]):
        _image(folder / f"{i:05d}-a red ball.png", background, i)
    return folder


def _data(folder: Path, **changes) -> DatasetConfig:
    return DatasetConfig(path=str(folder), size=64, template="subject", **changes)


def _method(name: str = "zqx", **changes) -> EmbeddingMethod:
    return EmbeddingMethod(EmbeddingConfig(name=name, init_text="ball", vectors=2, **changes))


def _expect(model) -> dict[str, int]:
    return {encoder.key: encoder.width for encoder in model.text_encoders}


# --- it learns ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_embedding_lowers_the_loss_on_a_fixed_evaluation_set(arch, tiny_checkpoints, red_ball, tmp_path) -> None:
    """Threshold: 5% below the start, and below each of 8 random embeddings of equal norm.

    On these tiny random models the evaluation loss varies by about 1-2% between random
    embeddings, so a 5% drop that also beats every random draw is learning, not chance.
    """
    model = load_model(tiny_checkpoints[arch])
    method = _method()
    method.attach(model)
    before = fixed_eval_loss(model, red_ball, "zqx", method.prompt_embeddings()["zqx"])
    method.detach()
    loop = dataclasses.replace(FAST, steps=100)
    result = train(model, method, _data(red_ball), loop, tmp_path)
    trained = read_embedding(result.result, expect=_expect(model)).vectors
    after = fixed_eval_loss(model, red_ball, "zqx", trained)
    random_losses = [fixed_eval_loss(model, red_ball, "zqx", random_like(trained, seed)) for seed in range(8)]
    assert after < 0.95 * before, (before, after)
    assert after < min(random_losses), (after, random_losses)


def test_embedding_overfits_a_single_image(tiny_checkpoints, tmp_path) -> None:
    """One image, trained at a high learning rate: its loss falls by at least a tenth.

    Textual inversion can only change the text conditioning, so on the tiny SDXL model the loss
    of one image bottoms out about 12-13% below the start (measured: 0.877 of it after 150 steps,
    0.869 after 300); random embeddings move it by 1-2%.
    """
    folder = tmp_path / "one"
    folder.mkdir()
    _image(folder / "ball.png", (20, 120, 200), 0)
    model = load_model(tiny_checkpoints["sdxl"])
    method = _method()
    method.attach(model)
    before = fixed_eval_loss(model, folder, "zqx", method.prompt_embeddings()["zqx"])
    method.detach()
    result = train(model, method, _data(folder), dataclasses.replace(FAST, steps=150, lr="0.02"), tmp_path / "out")
    after = fixed_eval_loss(model, folder, "zqx", read_embedding(result.result, expect=_expect(model)).vectors)
    assert after < 0.9 * before, (before, after)


def test_only_the_new_vectors_receive_gradients(tiny_sd1, red_ball, tmp_path) -> None:
    method = _method()
    train(tiny_sd1, method, _data(red_ball), dataclasses.replace(FAST, steps=2), tmp_path)
    assert requires_grad_snapshot(tiny_sd1.modules) == frozenset()
    assert all(p.grad is None for m in tiny_sd1.modules.values() for p in m.parameters())


def test_sdxl_trains_a_clip_l_and_a_clip_g_part(tiny_sdxl, red_ball, tmp_path) -> None:
    method = _method()
    method.attach(tiny_sdxl)
    start = method.vectors()
    method.detach()
    result = train(tiny_sdxl, method, _data(red_ball), FAST, tmp_path)
    saved = read_embedding(result.result, expect=_expect(tiny_sdxl)).vectors
    assert set(saved) == {"clip_l", "clip_g"}
    for key in saved:
        assert not torch.equal(saved[key], start[key]), f"{key} did not change"


# --- initialisation ---------------------------------------------------------------------------------


def test_init_text_tokens_are_spread_over_the_vectors(tiny_sd1) -> None:
    encoder = tiny_sd1.text_encoders[0]
    ids = encoder.tokenizer.encode("red car")
    vectors = initial_vectors(encoder, "red car", 4)
    table = encoder.token_embedding.weight
    assert torch.equal(vectors[0], table[ids[0]]) and torch.equal(vectors[1], table[ids[0]])
    assert torch.equal(vectors[2], table[ids[1]]) and torch.equal(vectors[3], table[ids[1]])


def test_empty_init_text_starts_from_zeros(tiny_sd1) -> None:
    assert torch.count_nonzero(initial_vectors(tiny_sd1.text_encoders[0], "", 3)) == 0


def test_continue_from_an_existing_pt_embedding(tiny_sd1, red_ball, tmp_path) -> None:
    start = {"clip_l": torch.randn(3, tiny_sd1.text_encoders[0].width)}
    old = write_embedding(tmp_path / "old.pt", EmbeddingFile("old", start, step=7))
    method = _method(continue_from=str(old))
    method.attach(tiny_sd1)
    assert torch.equal(method.vectors()["clip_l"], start["clip_l"])
    method.detach()


# --- resume -----------------------------------------------------------------------------------------


def test_interrupt_then_resume_ends_bit_identical_to_an_uninterrupted_run(tiny_sd1, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=12, batch_size=2, latent_sampling="random", noise_offset=0.05)
    straight = train(tiny_sd1, _method(), _data(red_ball, flip=True), loop, tmp_path / "a")

    stop_after = {"steps": 0}

    def stop() -> bool:
        stop_after["steps"] += 1
        return stop_after["steps"] > 5  # checked before each step: stops after 5 steps

    first = train(tiny_sd1, _method(), _data(red_ball, flip=True), loop, tmp_path / "b", should_stop=stop)
    assert first.interrupted and first.step == 5
    resumed = train(tiny_sd1, _method(), _data(red_ball, flip=True), loop, tmp_path / "b", resume=True)
    assert not resumed.interrupted and resumed.step == 12
    a = read_embedding(straight.result, expect=_expect(tiny_sd1)).vectors
    b = read_embedding(resumed.result, expect=_expect(tiny_sd1)).vectors
    assert torch.equal(a["clip_l"], b["clip_l"])


def test_resume_with_changed_settings_is_refused(tiny_sd1, red_ball, tmp_path) -> None:
    train(tiny_sd1, _method(), _data(red_ball), dataclasses.replace(FAST, steps=2), tmp_path)
    with pytest.raises(UserError, match="differs in seed"):
        train(tiny_sd1, _method(), _data(red_ball), dataclasses.replace(FAST, seed=5), tmp_path, resume=True)


# --- the model is left as it was ---------------------------------------------------------------------


def _model_state(model):
    return weights_fingerprint(model.modules), hooks_snapshot(model.modules), requires_grad_snapshot(model.modules)


def test_model_is_unchanged_after_training(tiny_sd1, red_ball, tmp_path) -> None:
    before = _model_state(tiny_sd1)
    train(tiny_sd1, _method(), _data(red_ball), dataclasses.replace(FAST, gradient_checkpointing=True), tmp_path)
    assert _model_state(tiny_sd1) == before
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_sd1.unet_module.modules())


def test_a_run_stopped_before_its_first_step_writes_no_result(tiny_sd1, red_ball, tmp_path) -> None:
    result = train(tiny_sd1, _method(), _data(red_ball), FAST, tmp_path, should_stop=lambda: True)
    assert result.interrupted and result.step == 0
    assert not result.result.exists() and not (tmp_path / "resume.pt").exists()


def test_model_is_unchanged_after_an_interrupt(tiny_sd1, red_ball, tmp_path) -> None:
    before = _model_state(tiny_sd1)
    calls = iter(range(100))
    result = train(tiny_sd1, _method(), _data(red_ball), FAST, tmp_path, should_stop=lambda: next(calls) >= 3)
    assert result.interrupted
    assert _model_state(tiny_sd1) == before


def test_model_is_unchanged_after_a_failure(tiny_sd1, red_ball, tmp_path, monkeypatch) -> None:
    before = _model_state(tiny_sd1)
    calls = {"n": 0}
    original = type(tiny_sd1).predict

    def failing_predict(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_sd1), "predict", failing_predict)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tiny_sd1, _method(), _data(red_ball), FAST, tmp_path)
    monkeypatch.undo()
    assert _model_state(tiny_sd1) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


# --- outputs ------------------------------------------------------------------------------------------


def test_run_writes_result_checkpoints_previews_losses_and_config(tiny_sd1, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(FAST, steps=6, save_every=3, preview_every=3, preview_steps=2)
    progress = []
    train(tiny_sd1, _method(), _data(red_ball), loop, tmp_path, on_progress=progress.append)
    assert (tmp_path / "zqx.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["zqx-3.safetensors"]
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["zqx-000003.png", "zqx-000006.png"]
    from lib_training.dataset import load_template

    first_line = load_template("subject").lines[0].replace("[name]", "zqx")
    assert Image.open(tmp_path / "previews" / "zqx-000003.png").text["parameters"].startswith(first_line + "\n")
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,epoch,seconds" and len(rows) == 7
    assert Image.open(tmp_path / "loss.png").size == (640, 360)
    assert '"steps": 6' in (tmp_path / "config.json").read_text()
    training = [p for p in progress if p.phase == "training"]
    assert [p.step for p in training] == [1, 2, 3, 4, 5, 6]
    assert training[-1].steps_per_second and training[-1].eta_seconds == 0
    assert training[-1].preview == tmp_path / "previews" / "zqx-000006.png"


@pytest.mark.parametrize(("arch", "expected"), [("sd1", {"emb_params": (2, 128)}), ("sd2", {"emb_params": (2, 128)}),
                                                 ("sdxl", {"clip_l": (2, 64), "clip_g": (2, 128)})])  # fmt: skip
def test_saved_file_has_the_keys_and_shapes_webui_loaders_require(arch, expected, tiny_checkpoints, red_ball, tmp_path):
    model = load_model(tiny_checkpoints[arch])
    result = train(model, _method(), _data(red_ball), dataclasses.replace(FAST, steps=1), tmp_path)
    with open_tensors(result.result) as source:
        assert source.shapes() == expected
        assert source.metadata["step"] == "1" and source.metadata["name"] == "zqx"


def test_pt_format_on_request(tiny_sd1, red_ball, tmp_path) -> None:
    result = train(tiny_sd1, _method(file_format="pt"), _data(red_ball), dataclasses.replace(FAST, steps=1), tmp_path)
    assert result.result.suffix == ".pt"
    saved = torch.load(result.result, weights_only=True)
    assert list(saved["string_to_param"]) == ["*"] and saved["string_to_param"]["*"].shape == (2, 128)


# --- bad input ------------------------------------------------------------------------------------------


def test_existing_result_is_not_overwritten_without_permission(tiny_sd1, red_ball, tmp_path) -> None:
    (tmp_path / "zqx.safetensors").write_bytes(b"earlier work")
    with pytest.raises(ConfigError, match="already exists"):
        train(tiny_sd1, _method(), _data(red_ball), FAST, tmp_path)
    assert (tmp_path / "zqx.safetensors").read_bytes() == b"earlier work"


def test_template_without_the_name_is_refused(tiny_sd1, red_ball, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"without \[name\]"):
        train(tiny_sd1, _method(), DatasetConfig(path=str(red_ball), size=64, template="none"), FAST, tmp_path)


def test_unwritable_output_folder_is_named(tiny_sd1, red_ball, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to the output folder"):
        train(tiny_sd1, _method(), _data(red_ball), FAST, blocker / "out")


def test_bad_embedding_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot be a file name"):
        _method(name="a/b")


def test_nan_loss_stops_keeps_the_last_good_file_and_says_why(tiny_sd1, red_ball, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    original = type(tiny_sd1).predict

    def poisoned_predict(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(type(tiny_sd1), "predict", poisoned_predict)
    loop = dataclasses.replace(FAST, save_every=2)
    with pytest.raises(TrainingError, match=r"step 5: the loss became nan .*last good result .*lower the learning"):
        train(tiny_sd1, _method(), _data(red_ball), loop, tmp_path)
    kept = read_embedding(tmp_path / "zqx.safetensors", expect={"clip_l": 128})
    assert kept.step == 4 and torch.isfinite(kept.vectors["clip_l"]).all()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_out_of_memory_says_what_to_lower(tiny_sd1, red_ball, tmp_path, monkeypatch) -> None:
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(type(tiny_sd1), "predict", out_of_memory)
    with pytest.raises(TrainingError, match=r"out of memory at step 1 \(batch size 1, training size 64\)\. Lower"):
        train(tiny_sd1, _method(), _data(red_ball), FAST, tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_empty_dataset_folder_is_refused_before_training(tiny_sd1, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        train(tiny_sd1, _method(), _data(empty), FAST, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_trains_and_writes_name_safetensors(tiny_checkpoints, red_ball, tmp_path, capsys) -> None:
    from lib_training.app.cli import main

    out = tmp_path / "run"
    code = main(["train", "embedding", "--ckpt", str(tiny_checkpoints["sd1"]), "--data", str(red_ball),
                 "--name", "redball", "--out", str(out), "--steps", "3", "--size", "64", "--template", "subject",
                 "--preview-every", "0", "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert (out / "redball.safetensors").is_file()
    text = capsys.readouterr().out
    assert "images: 3" in text and "finished after 3 steps" in text
    assert os.path.getsize(out / "redball.safetensors") > 0
