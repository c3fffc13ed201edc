"""Text-encoder outputs cached before training (cache_text_outputs): every prompt of the run encoded once up
front, the encoders away from the GPU while training, the same result as encoding prompt by prompt, and
the outputs kept on disk for the next run when asked."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
from lora_support import FAST, data, make_red_balls, small_lora
from torch import nn

from lib_training.dataset import DatasetConfig, TrainingDataset
from lib_training.errors import ConfigError
from lib_training.formats.tensor_files import open_tensors
from lib_training.methods import spec_for
from lib_training.methods.lora import LoraMethod
from lib_training.model.placement import moved_to
from lib_training.options import SettingsError
from lib_training.training.request import parse_request
from lib_training.training.run import train
from lib_training.training.text_cache import TextOutputCache, encoders_fingerprint, prompt_key

CACHED = dataclasses.replace(FAST, steps=4, cache_text_outputs=True)


@pytest.fixture(scope="module")
def red_ball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_red_balls(tmp_path_factory.mktemp("red-ball"))


class Placement:
    """What happened on tiny_sdxl during a run: offloads and returns by part, and for every text-encoder
    and VAE call whether that part was offloaded at the time."""

    def __init__(self) -> None:
        self.events: list[str] = []  # "text away", "vae back", ...
        self.away = {"text": False, "vae": False}
        self.text_calls: list[bool] = []
        self.vae_calls: list[bool] = []


@pytest.fixture
def placement(tiny_sdxl, monkeypatch) -> Placement:
    seen = Placement()

    def counted(calls: list[bool], part: str, original):
        def call(*args, **kwargs):
            calls.append(seen.away[part])
            return original(*args, **kwargs)

        return call

    for encoder in tiny_sdxl.text_encoders:
        monkeypatch.setattr(encoder, "encode_embeddings", counted(seen.text_calls, "text", encoder.encode_embeddings))
    for name in ("encode", "decode"):
        monkeypatch.setattr(tiny_sdxl.vae, name, counted(seen.vae_calls, "vae", getattr(tiny_sdxl.vae, name)))
    offloaded = tiny_sdxl.offloaded

    @contextlib.contextmanager
    def recorded(part):
        with offloaded(part):
            seen.events.append(f"{part} away")
            seen.away[part] = True
            try:
                yield
            finally:
                seen.away[part] = False
                seen.events.append(f"{part} back")

    monkeypatch.setattr(tiny_sdxl, "offloaded", recorded)
    return seen


def _same_tensors(a: Path, b: Path) -> bool:
    with open_tensors(a) as first, open_tensors(b) as second:
        keys = first.keys()
        return keys == second.keys() and all(torch.equal(first.get(key), second.get(key)) for key in keys)


# --- the run ------------------------------------------------------------------------------------------------------


def test_cached_text_outputs_train_the_same_lora_as_encoding_on_the_way(tiny_sdxl, red_ball, tmp_path) -> None:
    lazily = dataclasses.replace(CACHED, cache_text_outputs=False)
    lazily = train(tiny_sdxl, small_lora(), data(red_ball), lazily, tmp_path / "a")
    up_front = train(tiny_sdxl, small_lora(), data(red_ball), CACHED, tmp_path / "b")
    assert _same_tensors(lazily.result, up_front.result)


def test_no_text_encoder_runs_while_training_on_cached_outputs(tiny_sdxl, red_ball, tmp_path, placement) -> None:
    """Previews and the validation loss are conditioned from the cache too."""
    loop = dataclasses.replace(
        CACHED, preview_every=2, preview_steps=2, preview_prompt="zqx", preview_negative="blurry"
    )
    train(tiny_sdxl, small_lora(), data(red_ball, validation_images=1), loop, tmp_path)
    assert placement.text_calls and not any(placement.text_calls)  # all came before the encoders went away
    prompts = 2 + 1 + 2 + 1  # two training captions, the held-out one, the preview's two, the empty padding
    assert len(placement.text_calls) == prompts * len(tiny_sdxl.text_encoders)


def test_the_text_encoders_are_offloaded_for_the_steps_only_with_the_option(
    tiny_sdxl, red_ball, tmp_path, placement
) -> None:
    train(tiny_sdxl, small_lora(), data(red_ball), CACHED, tmp_path / "cached")
    assert placement.events.count("text away") == placement.events.count("text back") == 1
    lazily = dataclasses.replace(CACHED, cache_text_outputs=False)
    train(tiny_sdxl, small_lora(), data(red_ball), lazily, tmp_path / "b")
    assert placement.events.count("text away") == 1


def test_the_vae_is_away_for_the_steps_and_back_for_each_preview(tiny_sdxl, red_ball, tmp_path, placement) -> None:
    loop = dataclasses.replace(FAST, steps=4, preview_every=2, preview_steps=2)
    train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path)
    assert placement.events == ["vae away", "vae back"] * 3  # steps 1-2, preview, steps 3-4, preview, the end
    assert placement.vae_calls and not any(placement.vae_calls)  # caching latents and decoding previews


def test_a_resumed_run_on_cached_outputs_ends_as_an_uninterrupted_one(tiny_sdxl, red_ball, tmp_path) -> None:
    loop = dataclasses.replace(CACHED, steps=6, batch_size=2, cache_text_outputs_to_disk=True)
    straight = train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "a")
    calls = iter(range(100))
    stop = lambda: next(calls) >= 3  # noqa: E731  (checked before each step: stops after 3)
    first = train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "b", should_stop=stop)
    resumed = train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "b", resume=True)
    assert first.step == 3 and resumed.step == 6
    assert _same_tensors(straight.result, resumed.result)


def test_a_failing_run_brings_every_part_back(tiny_sdxl, red_ball, tmp_path, placement, monkeypatch) -> None:
    steps = iter(range(100))

    def failing(self, outputs):
        if next(steps) == 2:
            raise RuntimeError("a failure in the third step")
        return outputs.loss

    monkeypatch.setattr(LoraMethod, "objective", failing)
    with pytest.raises(RuntimeError, match="third step"):
        train(tiny_sdxl, small_lora(), data(red_ball), CACHED, tmp_path)
    assert sorted(placement.events) == ["text away", "text back", "vae away", "vae back"]
    assert placement.events[-2:] == ["vae back", "text back"]  # in the reverse order of going away


def test_outputs_on_disk_serve_the_next_run_without_encoding(tiny_sdxl, red_ball, tmp_path, placement) -> None:
    loop = dataclasses.replace(CACHED, cache_text_outputs_to_disk=True)
    first = train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "a", cache_dir=tmp_path / "cache")
    encoded = len(placement.text_calls)
    second = train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert encoded > 0 and len(placement.text_calls) == encoded
    assert [p.name for p in (tmp_path / "cache").glob("text-*.safetensors")] != []
    assert _same_tensors(first.result, second.result)


def test_a_damaged_cache_file_is_encoded_again(tiny_sdxl, red_ball, tmp_path, placement) -> None:
    loop = dataclasses.replace(CACHED, cache_text_outputs_to_disk=True, steps=1)
    train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "a", cache_dir=tmp_path / "cache")
    (file,) = (tmp_path / "cache").glob("text-*.safetensors")
    file.write_bytes(b"not a safetensors file")
    encoded = len(placement.text_calls)
    train(tiny_sdxl, small_lora(), data(red_ball), loop, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert len(placement.text_calls) == 2 * encoded
    rewritten = TextOutputCache(tiny_sdxl, tmp_path / "cache")._load_disk()
    assert f"{prompt_key('zqx, red ball, blue background')}.context" in rewritten


def test_other_clip_skip_is_another_cache(tiny_sd1) -> None:
    encoder = tiny_sd1.text_encoders[0]
    before = encoders_fingerprint(tiny_sd1)
    encoder.clip_skip = 2
    try:
        assert encoders_fingerprint(tiny_sd1) != before
    finally:
        encoder.clip_skip = 1
    assert encoders_fingerprint(tiny_sd1) == before


# --- what the cache computes -------------------------------------------------------------------------------------


def test_prompts_of_different_lengths_are_padded_as_encoding_them_together(tiny_sdxl) -> None:
    prompts = ["a red ball", ", ".join(f"tag{i}" for i in range(60))]  # one chunk, and several
    cache = TextOutputCache(tiny_sdxl)
    cache.fill(prompts)
    cached = cache.conditioning(prompts)
    with torch.no_grad():
        together = tiny_sdxl.encode_prompts(prompts)
    assert cached.context.shape == together.context.shape and cached.context.shape[1] > 77
    assert torch.allclose(cached.context, together.context, atol=1e-5)
    assert torch.allclose(cached.y, together.y, atol=1e-5)


def test_a_filled_cache_refuses_prompts_it_was_not_given(tiny_sd1) -> None:
    cache = TextOutputCache(tiny_sd1)
    cache.fill(["a red ball"])
    with pytest.raises(RuntimeError, match="not among the prompts cached"):
        cache.conditioning(["a blue ball"])


def test_every_prompt_a_run_can_draw_is_listed(red_ball, tmp_path) -> None:
    template = tmp_path / "two-lines.txt"
    template.write_text("a photo of [name], [filewords]\n[filewords] by [name]\n")
    config = DatasetConfig(path=str(red_ball), size=64, template=str(template), caption_dropout=0.5)
    dataset = TrainingDataset(config, "zqx")
    prompts = dataset.all_prompts()
    assert len(prompts) == 3 * 2 + 2  # three captions and the dropped caption, on two lines
    assert "a photo of zqx" in prompts and "zqx, red ball, green background by zqx" in prompts


# --- what is refused, before any work --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "data_settings", "message"),
    [
        ({"train_text_encoder": True}, {}, "frozen text encoders"),
        ({"pivotal_token": "zqx"}, {}, "frozen text encoders"),
        ({}, {"shuffle_tags": True}, "fixed prompts"),
        ({}, {"tag_dropout": 0.1}, "fixed prompts"),
    ],
)
def test_requests_that_cannot_cache_text_outputs_are_refused(red_ball, method, data_settings, message) -> None:
    body = {
        "method": {"name": "zqx", **method},
        "data": {"path": str(red_ball), "size": 64, **data_settings},
        "loop": {"steps": 10, "cache_text_outputs": True},
    }
    with pytest.raises(SettingsError) as caught:
        parse_request(spec_for("lora"), body)
    assert message in caught.value.errors["loop.cache_text_outputs"]


def test_textual_inversion_cannot_cache_its_text_outputs(red_ball) -> None:
    body = {
        "method": {"name": "zqx"},
        "data": {"path": str(red_ball), "size": 64},
        "loop": {"cache_text_outputs": True},
    }
    with pytest.raises(SettingsError, match="frozen text encoders"):
        parse_request(spec_for("embedding"), body)


def test_the_trainer_refuses_changing_prompts_before_encoding_any_image(
    tiny_sd1, red_ball, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(tiny_sd1, "encode_latent_distribution", lambda *a, **k: pytest.fail("the VAE ran"))
    with pytest.raises(ConfigError, match="fixed prompts"):
        train(tiny_sd1, small_lora(), data(red_ball, shuffle_tags=True), CACHED, tmp_path)


def test_more_prompts_than_can_be_kept_are_refused_before_encoding_any_image(
    tiny_sd1, red_ball, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr("lib_training.training.trainer.MAX_PROMPTS", 2)
    monkeypatch.setattr(tiny_sd1, "encode_latent_distribution", lambda *a, **k: pytest.fail("the VAE ran"))
    with pytest.raises(ConfigError, match="3 different prompts"):
        train(tiny_sd1, small_lora(), data(red_ball), CACHED, tmp_path)


# --- moving modules ---------------------------------------------------------------------------------------------


def test_moved_to_moves_each_module_and_returns_it_where_it_was() -> None:
    calls: list[tuple[str, torch.device]] = []
    modules = {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2), "none": nn.ReLU()}
    for name, module in modules.items():
        module.to = lambda device, name=name: calls.append((name, device))  # records instead of moving
    with moved_to(modules.values(), torch.device("meta")):
        assert calls == [("a", torch.device("meta")), ("b", torch.device("meta"))]
    assert calls[2:] == [("a", torch.device("cpu")), ("b", torch.device("cpu"))]


def test_moved_to_leaves_modules_already_there_alone() -> None:
    module = nn.Linear(2, 2)
    module.to = lambda device: pytest.fail("moved")
    with moved_to([module], torch.device("cpu")):
        pass
