"""Aesthetic gradients: making an embedding from images, and personalising the text towers with it."""

from __future__ import annotations

import copy as copy_module
from pathlib import Path

import pytest
import torch
from aesthetic_support import picture_folder, tiny_clip
from PIL import Image

from lib_training.aesthetic.clip_model import ClipSource, load_clip_model
from lib_training.aesthetic.create import create_embedding
from lib_training.aesthetic.embedding_file import AestheticEmbedding, load_embedding, save_embedding
from lib_training.aesthetic.personalise import (
    AestheticSettings,
    Personaliser,
    PrivateTower,
    aesthetic_applied,
    format_parameters,
    slerp,
)
from lib_training.app.cli import main
from lib_training.dataset.errors import DatasetError
from lib_training.errors import UserError
from lib_training.formats.fingerprint import hooks_snapshot, requires_grad_snapshot, weights_fingerprint
from lib_training.formats.pt_format import webui_pt_problems
from lib_training.model.prompt import tokenize
from lib_training.model.sampler import SampleSettings, generate
from lib_training.model.standalone import load_model

FAST = AestheticSettings(steps=3, lr=1e-3)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip")


@pytest.fixture(scope="module")
def sd1_clip(clip_folder: Path) -> ClipSource:
    return tiny_clip(clip_folder, text_width=128)  # the tiny SD1's CLIP-L is 128 wide


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return picture_folder(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def tiny_sd2(tiny_checkpoints):
    return load_model(tiny_checkpoints["sd2"])


def random_embedding(width: int, name: str = "style", seed: int = 0) -> AestheticEmbedding:
    return AestheticEmbedding(name, torch.randn(1, width, generator=torch.Generator().manual_seed(seed)))


def context(model, prompt: str = "a red ball") -> torch.Tensor:
    with torch.no_grad():
        return model.encode_prompts([prompt]).context


# --- making an embedding ------------------------------------------------------------------------
def test_a_created_embedding_is_the_mean_of_the_raw_image_features(pictures, sd1_clip, tmp_path) -> None:
    result = create_embedding(pictures, "style", tmp_path, sd1_clip, batch_size=2)
    embedding = load_embedding(result.result)
    model, preprocess = load_clip_model(sd1_clip)
    paths = sorted(pictures.iterdir())
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        expected = model.encode_image(pixels).mean(dim=0, keepdim=True)
    assert result.images == len(paths) == 5
    assert embedding.features.shape == (1, 32) and embedding.features.dtype == torch.float32
    torch.testing.assert_close(embedding.features, expected, rtol=1e-5, atol=1e-6)


def test_the_embedding_file_is_one_fp32_tensor_that_the_webui_opens(tmp_path) -> None:
    path = save_embedding(tmp_path / "style.pt", torch.randn(768))
    assert webui_pt_problems(path.read_bytes()) == []
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, torch.Tensor) and loaded.shape == (1, 768) and loaded.dtype == torch.float32


@pytest.mark.parametrize("variant", ["fp16 [1, D]", "fp32 [D]"])
def test_published_variants_are_read_as_fp32_1_by_d(tmp_path, variant) -> None:
    features = torch.randn(1, 768)
    stored = features.half() if variant.startswith("fp16") else features[0]
    torch.save(stored, tmp_path / "v.pt")
    embedding = load_embedding(tmp_path / "v.pt")
    assert embedding.features.shape == (1, 768) and embedding.features.dtype == torch.float32
    torch.testing.assert_close(embedding.features, stored.float().reshape(1, -1))


def test_a_stopped_creation_writes_nothing(pictures, sd1_clip, tmp_path) -> None:
    from lib_training.aesthetic.create import CancelledError

    with pytest.raises(CancelledError, match="no embedding was written"):
        create_embedding(pictures, "style", tmp_path, sd1_clip, should_stop=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_image_folder_is_refused_with_a_message(sd1_clip, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        create_embedding(tmp_path / "empty", "style", tmp_path / "out", sd1_clip)


def test_unreadable_images_are_named_before_any_work(sd1_clip, tmp_path) -> None:
    folder = picture_folder(tmp_path / "pictures", count=2)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"1 of 3 images .* cannot be read \(broken.png\)"):
        create_embedding(folder, "style", tmp_path / "out", sd1_clip)
    assert not (tmp_path / "out").exists()


def test_a_missing_clip_weights_file_is_refused_with_a_message(pictures, tmp_path) -> None:
    source = ClipSource(weights=tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match=r"CLIP weights file not found: .*missing\.safetensors"):
        create_embedding(pictures, "style", tmp_path / "out", source)


def test_a_file_that_is_not_an_embedding_is_refused(tmp_path) -> None:
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}}, tmp_path / "ti.pt")
    with pytest.raises(UserError, match="not an aesthetic embedding"):
        load_embedding(tmp_path / "ti.pt")


# --- the mixing arithmetic --------------------------------------------------------------------------
def test_slerp_is_the_extensions_formula_along_dimension_1() -> None:
    low, high = torch.randn(2, 77, 8), torch.randn(2, 77, 8)
    t = 0.3
    ln, hn = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((ln * hn).sum(1))
    so = torch.sin(omega)
    expected = (torch.sin((1 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high
    torch.testing.assert_close(slerp(low, high, t), expected)
    torch.testing.assert_close(slerp(low, high, 0.0), low)
    assert torch.isfinite(slerp(low, low, 0.5)).all()


def test_the_infotext_carries_the_extensions_parameter_names() -> None:
    params = AestheticSettings(text="red, bright").infotext("style")
    assert list(params) == [
        "Aesthetic LR", "Aesthetic weight", "Aesthetic steps", "Aesthetic embedding", "Aesthetic slerp",
        "Aesthetic text", "Aesthetic text negative", "Aesthetic slerp angle",
    ]  # fmt: skip
    assert 'Aesthetic text: "red, bright"' in format_parameters(params)
    assert "Aesthetic weight: 0.9, Aesthetic steps: 5" in format_parameters(params)


# --- personalising --------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [AestheticSettings(weight=0.0), AestheticSettings(steps=0)], ids=["w0", "steps0"])
def test_weight_or_steps_zero_leaves_the_conditioning_identical(tiny_sd1, sd1_clip, settings) -> None:
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    assigned = personaliser.match([random_embedding(32)])
    with aesthetic_applied(personaliser, assigned, settings):
        personalised = context(tiny_sd1)
    assert torch.equal(personalised, context(tiny_sd1))
    assert personaliser.optimisations == 0


def test_optimisation_raises_the_similarity_of_the_text_features_to_the_target(tiny_sd1, sd1_clip) -> None:
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    with aesthetic_applied(personaliser, personaliser.match([random_embedding(32)]), AestheticSettings(lr=1e-3)):
        context(tiny_sd1)
    before, after = personaliser.similarity
    assert after > before + 0.05, (before, after)


def _personalised_by_deep_copy(tower: PrivateTower, ids, target, settings: AestheticSettings) -> torch.Tensor:
    """The extension's way: a deep copy of the whole tower, Adam on every parameter but the projection."""
    copy = copy_module.deepcopy(tower.module)
    params = [p for n, p in copy.named_parameters() if n not in ("text_projection", "logit_scale")]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    with torch.enable_grad():
        for _ in range(settings.steps):
            features = copy.encode_embeddings(copy.token_embedding(ids), ids).pooled
            loss = -(features / features.norm(dim=-1, keepdim=True) @ target.T).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return copy.encode_embeddings(copy.token_embedding(ids), ids).hidden


def test_tuning_only_the_used_embedding_rows_equals_tuning_the_whole_copy(tiny_sd1, sd1_clip) -> None:
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    encoder, embedding, settings = tiny_sd1.text_encoders[0], random_embedding(32), AestheticSettings(lr=1e-3)
    ids = tokenize(["a red ball"], encoder.tokenizer, {}).ids[:, 0]
    with torch.no_grad():
        ours, _ = personaliser.personalised(encoder, encoder.token_embedding(ids), ids, embedding, settings)
    tower = personaliser.tower(encoder)
    tower.reset(encoder.tower_weights())
    theirs = _personalised_by_deep_copy(tower, ids, embedding.target(), settings)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_conditioning_moves_and_the_hosts_text_encoder_is_untouched(tiny_sd1, sd1_clip) -> None:
    modules = tiny_sd1.modules
    before = (weights_fingerprint(modules), hooks_snapshot(modules), requires_grad_snapshot(modules))
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    with aesthetic_applied(personaliser, personaliser.match([random_embedding(32)]), FAST):
        personalised = context(tiny_sd1)
    assert not torch.allclose(personalised, context(tiny_sd1))
    assert (weights_fingerprint(modules), hooks_snapshot(modules), requires_grad_snapshot(modules)) == before
    tower = personaliser.tower(tiny_sd1.text_encoders[0]).module
    host = {p.data_ptr() for p in modules["clip_l"].parameters()}
    assert not host & {p.data_ptr() for p in tower.parameters()}


def test_a_second_image_with_the_same_settings_reuses_the_personalised_conditioning(tiny_sd1, sd1_clip) -> None:
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    settings = SampleSettings("a red ball", "blurry", steps=1, width=64, height=64)
    with aesthetic_applied(personaliser, personaliser.match([random_embedding(32)]), FAST):
        first = generate(tiny_sd1, settings)
        assert personaliser.optimisations == 2  # the prompt and the negative prompt, as the extension does
        second = generate(tiny_sd1, settings)
        assert personaliser.optimisations == 2
        generate(tiny_sd1, SampleSettings("a blue cube", "blurry", steps=1, width=64, height=64))
        assert personaliser.optimisations == 3
    assert first.tobytes() == second.tobytes()


def test_weights_changed_in_place_are_personalised_again(tiny_sd1, sd1_clip) -> None:
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    with aesthetic_applied(personaliser, personaliser.match([random_embedding(32)]), FAST):
        context(tiny_sd1)
        weight = tiny_sd1.modules["clip_l"].ln_final.weight
        with torch.no_grad():
            weight.add_(1.0)
            weight.sub_(1.0)  # what a host's LoRA merge and restore do
        context(tiny_sd1)
    assert personaliser.optimisations == 2


def test_text_for_images_turns_the_target(tiny_sd1, sd1_clip) -> None:
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    assigned = personaliser.match([random_embedding(32)])
    results = []
    for settings in (FAST, AestheticSettings(steps=3, lr=1e-3, text="blue"), AestheticSettings(
        steps=3, lr=1e-3, text="blue", text_negative=True
    )):  # fmt: skip
        with aesthetic_applied(personaliser, assigned, settings):
            results.append(context(tiny_sd1))
    assert not torch.allclose(results[0], results[1]) and not torch.allclose(results[1], results[2])


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_the_private_tower_conditions_exactly_like_the_model_before_tuning(
    arch, tiny_sd1, tiny_sd2, tiny_sdxl, clip_folder
) -> None:
    model = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[arch]
    for encoder in model.text_encoders:
        projection = None
        if encoder.config.projection_dim is None:
            projection = torch.randn(encoder.width, 32)
        tower = PrivateTower(encoder, projection, model.device)
        ids = tokenize(["a red ball, on grass"], encoder.tokenizer, {}).ids[:, 0]
        with torch.no_grad():
            embeds = encoder.token_embedding(ids)
            ours, theirs = tower.module.encode_embeddings(embeds, ids), encoder.encode_embeddings(embeds, ids)
        torch.testing.assert_close(ours.hidden, theirs.hidden, rtol=1e-5, atol=1e-5)
        if theirs.pooled is not None:
            torch.testing.assert_close(ours.pooled, theirs.pooled, rtol=1e-5, atol=1e-5)


def test_sd2_personalises_its_openclip_tower_with_its_own_projection(tiny_sd2) -> None:
    personaliser = Personaliser(tiny_sd2, ClipSource(weights=Path("/nonexistent/unused.safetensors")))
    assigned = personaliser.match([random_embedding(128)])
    assert list(assigned) == ["clip_h"]
    with aesthetic_applied(personaliser, assigned, FAST):
        personalised = context(tiny_sd2)
    assert not torch.allclose(personalised, context(tiny_sd2))


def test_sdxl_embeddings_go_to_the_encoder_of_their_width(tiny_sdxl, clip_folder) -> None:
    personaliser = Personaliser(tiny_sdxl, tiny_clip(clip_folder, text_width=64))  # the tiny SDXL's CLIP-L
    small, large = random_embedding(32, "small"), random_embedding(128, "large")
    assert list(personaliser.match([small])) == ["clip_l"]
    assert list(personaliser.match([large])) == ["clip_g"]
    assert personaliser.match([small, large]) == {"clip_l": small, "clip_g": large}
    with torch.no_grad():
        plain = tiny_sdxl.encode_prompts(["a red ball"])
        with aesthetic_applied(personaliser, {"clip_g": large}, FAST):
            tuned = tiny_sdxl.encode_prompts(["a red ball"])
    width_l = tiny_sdxl.text_encoders[0].width
    assert torch.equal(tuned.context[..., :width_l], plain.context[..., :width_l])  # CLIP-L's part unchanged
    assert not torch.allclose(tuned.context[..., width_l:], plain.context[..., width_l:])
    assert not torch.allclose(tuned.pooled, plain.pooled)


def test_an_embedding_that_fits_no_encoder_is_refused_with_the_widths(tiny_sd1, sd1_clip) -> None:
    personaliser = Personaliser(tiny_sd1, sd1_clip)
    with pytest.raises(UserError, match=r"'odd' is 1024 wide, but the text features of this sd1 model are clip_l 32"):
        personaliser.match([random_embedding(1024, "odd")])


def test_two_embeddings_for_one_encoder_are_refused(tiny_sd1, sd1_clip) -> None:
    with pytest.raises(UserError, match="both fit the clip_l text encoder"):
        Personaliser(tiny_sd1, sd1_clip).match([random_embedding(32, "a"), random_embedding(32, "b")])


def test_clip_l_without_its_clip_weights_is_refused_with_a_message(tiny_sd1, tmp_path) -> None:
    personaliser = Personaliser(tiny_sd1, ClipSource(weights=tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="CLIP weights file not found"):
        personaliser.match([random_embedding(768)])


def test_the_projection_is_also_read_from_a_transformers_clip_model_file(tmp_path) -> None:
    """transformers' `CLIPModel` stores the projection as a Linear [P, W]; open_clip as [W, P]."""
    from lib_training.aesthetic.clip_model import text_projection
    from lib_training.formats.tensor_files import save_safetensors

    linear = torch.randn(768, 768)
    save_safetensors(tmp_path / "model.safetensors", {"text_projection.weight": linear})
    source = ClipSource(weights=tmp_path / "model.safetensors")
    assert source.feature_width() == 768
    torch.testing.assert_close(text_projection(source), linear.T)


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(UserError, match=r"weight must be between 0 and 1.*steps must be 0 or more"):
        AestheticSettings(weight=1.5, steps=-1).check()


# --- command line ---------------------------------------------------------------------------------------
def test_cli_creates_an_embedding_and_generates_with_it(tiny_checkpoints, pictures, sd1_clip, tmp_path) -> None:
    clip = ["--clip-model", sd1_clip.model, "--clip-weights", str(sd1_clip.weights)]
    code = main(["aesthetic", "create", "--data", str(pictures), "--name", "style", "--out", str(tmp_path),
                 "--device", "cpu", *clip])  # fmt: skip
    assert code == 0 and load_embedding(tmp_path / "style.pt").width == 32
    out = tmp_path / "image.png"
    code = main(["generate", "--ckpt", str(tiny_checkpoints["sd1"]), "--prompt", "a ball", "--out", str(out),
                 "--steps", "1", "--width", "64", "--height", "64", "--device", "cpu",
                 "--aesthetic", str(tmp_path / "style.pt"), "--aesthetic-steps", "2", "--aesthetic-slerp",
                 *clip])  # fmt: skip
    assert code == 0
    parameters = Image.open(out).text["parameters"]
    assert "Aesthetic steps: 2, Aesthetic embedding: style, Aesthetic slerp: True" in parameters
