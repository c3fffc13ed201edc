"""Textual-inversion embedding files: round trips, the layouts the WebUIs require, foreign formats, errors."""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import save_file

from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.embedding_files import EmbeddingFile, read_embedding, write_embedding

WIDTHS = {"sd1": {"clip_l": 768}, "sd2": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}


def _embedding(arch: str, n: int = 3, name: str = "cat", step: int | None = 42, seed: int = 0) -> EmbeddingFile:
    g = torch.Generator().manual_seed(seed)
    vectors = {key: torch.randn(n, width, generator=g) for key, width in WIDTHS[arch].items()}
    return EmbeddingFile(name, vectors, step, {"sd_checkpoint": "0123456789", "sd_checkpoint_name": "base"})


def _webui_pt(path: Path, tensor: torch.Tensor, **extra: object) -> Path:
    """An embedding saved the way the WebUI saves one (plain torch.save, this torch's format)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": "stored", "step": 7}
    torch.save({**data, **extra}, path)
    return path


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_safetensors_round_trip_keeps_vectors_step_and_metadata(tmp_path: Path, arch: str) -> None:
    original = _embedding(arch)
    path = write_embedding(tmp_path / "cat.safetensors", original)
    loaded = read_embedding(path, expect=WIDTHS[arch])
    assert loaded.name == "cat"
    assert loaded.step == 42
    assert loaded.metadata == original.metadata
    assert loaded.vectors.keys() == original.vectors.keys()
    for key, vectors in original.vectors.items():
        assert torch.equal(loaded.vectors[key], vectors)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_pt_round_trip_keeps_vectors_step_and_checkpoint(tmp_path: Path, arch: str) -> None:
    original = _embedding(arch)
    loaded = read_embedding(write_embedding(tmp_path / "cat.pt", original), expect=WIDTHS[arch])
    assert (loaded.name, loaded.step, loaded.metadata) == ("cat", 42, original.metadata)
    (key,) = WIDTHS[arch]
    assert torch.equal(loaded.vectors[key], original.vectors[key])


def test_sdxl_pt_round_trip_keeps_the_vectors_only(tmp_path: Path) -> None:
    original = _embedding("sdxl")
    loaded = read_embedding(write_embedding(tmp_path / "cat.pt", original), expect=WIDTHS["sdxl"])
    assert (loaded.step, loaded.metadata) == (
        None,
        {},
    )  # the WebUI's SDXL .pt is a bare {clip_l, clip_g} dict
    for key, vectors in original.vectors.items():
        assert torch.equal(loaded.vectors[key], vectors)


def test_round_trip_without_a_step(tmp_path: Path) -> None:
    for suffix in (".safetensors", ".pt"):
        path = write_embedding(tmp_path / f"dog{suffix}", _embedding("sd1", step=None))
        assert read_embedding(path).step is None


def test_vectors_of_one_dimension_become_one_vector() -> None:
    embedding = EmbeddingFile("x", {"clip_l": torch.zeros(768)})
    assert embedding.vectors["clip_l"].shape == (1, 768)
    assert embedding.num_vectors == 1


# --- what the WebUI loaders require ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_sd1_sd2_safetensors_hold_exactly_one_tensor(tmp_path: Path, arch: str) -> None:
    path = write_embedding(tmp_path / "cat.safetensors", _embedding(arch, n=4))
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        tensor = f.get_tensor("emb_params")
        assert f.metadata()["name"] == "cat"
        assert f.metadata()["step"] == "42"
    assert tensor.shape == (4, next(iter(WIDTHS[arch].values())))
    assert tensor.dtype == torch.float32


def test_sdxl_safetensors_hold_exactly_clip_l_and_clip_g(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "cat.safetensors", _embedding("sdxl", n=2))
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in names}
    assert shapes == {"clip_l": (2, 768), "clip_g": (2, 1280)}


def test_pt_holds_the_webui_keys_and_one_string_to_param_entry(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "cat.pt", _embedding("sd1", n=2))
    data = torch.load(path, weights_only=True)
    assert set(data) == {
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    }
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    assert data["string_to_param"]["*"].shape == (2, 768)
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == (
        "cat",
        42,
        "0123456789",
        "base",
    )


def test_pt_of_a_slice_does_not_store_the_whole_matrix(tmp_path: Path) -> None:
    matrix = torch.randn(4096, 768)  # 12 MiB, like a token-embedding table
    path = write_embedding(tmp_path / "row.pt", EmbeddingFile("row", {"clip_l": matrix[10:12]}))
    assert path.stat().st_size < 64 * 1024


def test_written_tensors_are_float32_and_detached(tmp_path: Path) -> None:
    vectors = torch.randn(2, 768, dtype=torch.float16, requires_grad=True)
    path = write_embedding(tmp_path / "x.pt", EmbeddingFile("x", {"clip_l": vectors}))
    stored = torch.load(path, weights_only=True)["string_to_param"]["*"]
    assert stored.dtype == torch.float32
    assert not stored.requires_grad


# --- foreign formats ---------------------------------------------------------------------------------


def test_reads_kohya_emb_params_safetensors(tmp_path: Path) -> None:
    tensor = torch.randn(5, 1024).half()
    save_file({"emb_params": tensor}, str(tmp_path / "style.safetensors"))
    loaded = read_embedding(tmp_path / "style.safetensors")
    assert loaded.name == "style"
    assert loaded.vectors["clip_h"].dtype == torch.float32
    assert torch.equal(loaded.vectors["clip_h"], tensor.float())


def test_reads_diffusers_learned_embeds_bin(tmp_path: Path) -> None:
    vector = torch.randn(768)
    torch.save({"<cat-toy>": vector}, tmp_path / "learned_embeds.bin")
    loaded = read_embedding(tmp_path / "learned_embeds.bin")
    assert torch.equal(loaded.vectors["clip_l"], vector[None])


def test_reads_diffusers_learned_embeds_safetensors_with_several_vectors(tmp_path: Path) -> None:
    tensor = torch.randn(2, 768)
    save_file({"<cat-toy>": tensor}, str(tmp_path / "learned_embeds.safetensors"))
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.safetensors").vectors["clip_l"], tensor)


def test_reads_a_webui_pt_written_by_plain_torch_save(tmp_path: Path) -> None:
    tensor = torch.randn(2, 768)
    path = _webui_pt(tmp_path / "webui.pt", tensor, sd_checkpoint="abcdef1234", sd_checkpoint_name="v1-5")
    loaded = read_embedding(path)
    assert loaded.name == "webui"  # the prompt token is the file name, not the stored name
    assert loaded.step == 7
    assert loaded.metadata == {"sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "v1-5"}
    assert torch.equal(loaded.vectors["clip_l"], tensor)


def test_reads_an_sdxl_safetensors_from_elsewhere(tmp_path: Path) -> None:
    tensors = {"clip_g": torch.randn(1, 1280).half(), "clip_l": torch.randn(1, 768).half()}
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    loaded = read_embedding(tmp_path / "xl.safetensors")
    assert loaded.layout == "SDXL"
    assert torch.equal(loaded.vectors["clip_g"], tensors["clip_g"].float())


def test_a_single_tensor_takes_the_expected_key_at_any_width(tmp_path: Path) -> None:
    save_file({"emb_params": torch.randn(2, 128)}, str(tmp_path / "tiny.safetensors"))
    assert list(read_embedding(tmp_path / "tiny.safetensors", expect={"clip_h": 128}).vectors) == ["clip_h"]


def _json_with_tensors(data: dict) -> str:
    """JSON as the WebUI writes it: each tensor becomes {"TORCHTENSOR": nested lists}."""

    def encode(obj: object) -> object:
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.tolist()}
        raise TypeError(type(obj))

    return json.dumps(data, default=encode)


def _image_data(tensor: torch.Tensor) -> dict:
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": tensor},
        "name": "stored-name",
        "step": 500,
    }


def test_reads_the_text_chunk_of_a_webui_png(tmp_path: Path) -> None:
    tensor = torch.randn(2, 768)
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(_json_with_tensors(_image_data(tensor)).encode()))
    Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / "cat-500.png", pnginfo=info)
    loaded = read_embedding(tmp_path / "cat-500.png")
    assert loaded.name == "stored-name"  # images carry their embedding's name, as the WebUI reads them
    assert loaded.step == 500
    assert torch.equal(loaded.vectors["clip_l"], tensor)


def _lcg_bytes(count: int) -> np.ndarray:
    """The WebUI's fixed sequence: x <- (1664525 x + 1013904223) mod 2^32 from x = 0, each x mod 255."""
    state, out = 0, []
    for _ in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        out.append(state % 255)
    return np.array(out, dtype=np.uint8)


def test_the_border_mask_sequence_matches_the_webui_reference_values() -> None:
    assert _lcg_bytes(8).tolist() == [253, 242, 127, 44, 157, 27, 239, 133]  # from A1111's own self-test


def _hide_in_borders(picture: Image.Image, data: dict) -> Image.Image:
    """[low nibbles | black | picture | black | high nibbles], as the WebUI's trainer lays it out."""
    packed = np.frombuffer(zlib.compress(_json_with_tensors(data).encode(), 9), dtype=np.uint8)
    rows = picture.height
    cols = math.ceil(packed.size / (rows * 3))
    padded = np.resize(packed, rows * cols * 3).reshape(rows, cols, 3)
    mask = _lcg_bytes(padded.size).reshape(padded.shape) & 0x0F
    pattern = 0x30  # the high bits only draw a pattern; here a plain one that keeps every pixel lit
    low = Image.fromarray(((padded & 0x0F) ^ mask) | pattern, "RGB")
    high = Image.fromarray(((padded >> 4) ^ mask) | pattern, "RGB")
    canvas = Image.new("RGB", (2 * cols + picture.width + 2, rows), (0, 0, 0))
    canvas.paste(low, (0, 0))
    canvas.paste(picture, (cols + 1, 0))
    canvas.paste(high, (cols + 1 + picture.width + 1, 0))
    return canvas


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_reads_an_embedding_hidden_in_image_borders(tmp_path: Path, suffix: str) -> None:
    tensor = torch.randn(1, 768)
    image = _hide_in_borders(Image.new("RGB", (32, 48), (128, 160, 96)), _image_data(tensor))
    path = tmp_path / f"cat{suffix}"
    image.save(path, lossless=True) if suffix == ".webp" else image.save(path)
    loaded = read_embedding(path)
    assert (loaded.name, loaded.step) == ("stored-name", 500)
    assert torch.equal(loaded.vectors["clip_l"], tensor)


# --- errors ---------------------------------------------------------------------------------------


def test_several_string_to_param_entries_are_refused(tmp_path: Path) -> None:
    torch.save({"string_to_param": {"*": torch.randn(1, 768), "#": torch.randn(1, 768)}}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"two\.pt holds 2 embeddings in string_to_param"):
        read_embedding(tmp_path / "two.pt")


def test_a_file_with_several_tensors_is_not_an_embedding(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match=r"lora\.safetensors holds 2 tensors \(a, b\)"):
        read_embedding(tmp_path / "lora.safetensors")


def test_a_file_without_tensors_is_not_an_embedding(tmp_path: Path) -> None:
    torch.save({"name": "x", "step": 3}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"empty\.pt holds no tensors"):
        read_embedding(tmp_path / "empty.pt")


def test_sdxl_embedding_for_an_sd1_model_is_refused(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "xl.safetensors", _embedding("sdxl"))
    with pytest.raises(CheckpointError, match=r"xl\.safetensors: this embedding is for SDXL .* but the model is SD1"):
        read_embedding(path, expect=WIDTHS["sd1"])


def test_sd2_embedding_for_an_sd1_model_is_refused(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "v2.pt", _embedding("sd2"))
    with pytest.raises(CheckpointError, match=r"is for SD2 \(1024-wide vectors\) but the model is SD1"):
        read_embedding(path, expect=WIDTHS["sd1"])


def test_sd1_embedding_for_an_sdxl_model_is_refused(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "v1.safetensors", _embedding("sd1"))
    with pytest.raises(CheckpointError, match=r"is for SD1 \(768-wide vectors\) but the model is SDXL"):
        read_embedding(path, expect=WIDTHS["sdxl"])


def test_an_unknown_width_needs_the_model(tmp_path: Path) -> None:
    save_file({"emb_params": torch.zeros(1, 320)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=r"odd\.safetensors holds 320-wide vectors"):
        read_embedding(tmp_path / "odd.safetensors")


def test_a_tensor_of_the_wrong_rank_is_refused(tmp_path: Path) -> None:
    save_file({"emb_params": torch.zeros(1, 2, 768)}, str(tmp_path / "cube.safetensors"))
    with pytest.raises(CheckpointError, match=r"cube\.safetensors: the embedding has shape \[1, 2, 768\]"):
        read_embedding(tmp_path / "cube.safetensors")


def test_sdxl_parts_with_different_vector_counts_are_refused(tmp_path: Path) -> None:
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="clip_l has 2 vectors but clip_g has 3"):
        read_embedding(tmp_path / "xl.safetensors")


def test_an_image_without_an_embedding_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "photo.png")
    with pytest.raises(CheckpointError, match=r"photo\.png holds no embedding"):
        read_embedding(tmp_path / "photo.png")


def test_an_unknown_file_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not an embedding file"):
        read_embedding(tmp_path / "notes.txt")


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_embedding(tmp_path / "missing.pt")


def test_writing_needs_a_known_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.safetensors or \.pt"):
        write_embedding(tmp_path / "cat.bin", _embedding("sd1"))


def test_writing_refuses_to_overwrite_when_asked_not_to(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "cat.safetensors", _embedding("sd1", seed=1))
    with pytest.raises(ConfigError, match="already exists"):
        write_embedding(path, _embedding("sd1", seed=2), overwrite=False)
    assert torch.equal(read_embedding(path).vectors["clip_l"], _embedding("sd1", seed=1).vectors["clip_l"])


def test_writing_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_embedding(tmp_path / "cat.safetensors", _embedding("sdxl"))
    write_embedding(tmp_path / "cat.pt", _embedding("sd1"))
    assert sorted(os.listdir(tmp_path)) == ["cat.pt", "cat.safetensors"]
