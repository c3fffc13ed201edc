"""Reading tensor files safely, and telling what a file is from its keys."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lib_training.errors import CheckpointError
from lib_training.formats.detection import detect_family, split_components
from lib_training.formats.family import Arch
from lib_training.formats.tensor_files import open_tensors, read_safetensors_header, save_safetensors


def _sd1_shapes(in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": (32, in_channels, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 64),
        "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
    }


# --- reading ------------------------------------------------------------------------------------


def test_safetensors_round_trip_keeps_tensors_dtypes_and_metadata(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(2).to(torch.float16),
        "c": torch.randn(5).to(torch.bfloat16),
    }
    save_safetensors(tmp_path / "x.safetensors", tensors, {"note": "hello"})
    with open_tensors(tmp_path / "x.safetensors") as source:
        assert source.metadata == {"note": "hello"}
        assert source.shape("a") == (3, 4)
        assert source.dtype("b") == torch.float16
        for key, value in tensors.items():
            assert torch.equal(source.get(key), value)


def test_save_leaves_no_temporary_file_and_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    save_safetensors(target, {"a": torch.zeros(2)})
    save_safetensors(target, {"a": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    with open_tensors(target) as source:
        assert torch.equal(source.get("a"), torch.ones(2))


def test_truncated_safetensors_is_reported_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        open_tensors(path)


def test_safetensors_with_a_cut_header_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(4)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors .*header"):
        read_safetensors_header(path)


def test_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file, not a model " * 10)
    with pytest.raises(CheckpointError, match=r"notes\.safetensors"):
        open_tensors(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"file not found: .*nothing\.ckpt"):
        open_tensors(tmp_path / "nothing.ckpt")


def test_ckpt_with_nested_state_dict_is_unwrapped_and_flattened(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    weight = torch.randn(2, 3)
    torch.save({"state_dict": {"model.diffusion_model.x": weight}, "global_step": 10}, path)
    with open_tensors(path) as source:
        assert source.keys() == ["model.diffusion_model.x"]
        assert torch.equal(source.get("model.diffusion_model.x"), weight)


def test_pt_embedding_flattens_to_dotted_keys_and_keeps_extras(tmp_path: Path) -> None:
    path = tmp_path / "emb.pt"
    vectors = torch.randn(2, 768)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "emb", "step": 5}, path)
    with open_tensors(path) as source:
        assert source.keys() == ["string_to_param.*"]
        assert source.extras["name"] == "emb"
        assert source.extras["string_to_token.*"] == 265


def test_ckpt_with_numpy_scalar_step_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "global_step": np.int64(470000)}, path)
    with open_tensors(path) as source:
        assert source.keys() == ["w"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"refused to load evil\.ckpt.*more than tensors"):
        open_tensors(path)
    assert not marker.exists()


def test_malicious_legacy_pickle_is_refused(tmp_path: Path) -> None:
    """A plain (non-zip) pickle stream, as older tools wrote."""
    path = tmp_path / "legacy.pt"
    buffer = io.BytesIO()
    pickle.dump({"x": _Exploit()}, buffer, protocol=2)
    path.write_bytes(buffer.getvalue())
    assert not zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError, match=r"legacy\.pt"):
        open_tensors(path)


def test_garbage_ckpt_is_reported_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match=r"junk\.ckpt"):
        open_tensors(path)


# --- what a file is -------------------------------------------------------------------------------


def test_sd1_detected_from_its_text_encoder_prefix() -> None:
    family = detect_family(_sd1_shapes(), {}, "m.safetensors")
    assert family.arch is Arch.SD1 and family.name == "sd1" and not family.is_inpainting


def test_inpainting_detected_from_nine_unet_input_channels() -> None:
    family = detect_family(_sd1_shapes(in_channels=9), {}, "m.safetensors")
    assert family.is_inpainting and family.describe() == "sd1 inpainting"


def test_sd2_and_sdxl_detected() -> None:
    sd2 = {
        "model.diffusion_model.input_blocks.0.0.weight": (64, 4, 3, 3),
        "cond_stage_model.model.token_embedding.weight": (49408, 128),
        "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
    }
    sdxl = {
        "model.diffusion_model.input_blocks.0.0.weight": (64, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 64),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 128),
        "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
    }
    assert detect_family(sd2, {}, "a").name == "sd2"
    assert detect_family(sd2, {"modelspec.prediction_type": "v"}, "a").name == "sd2-v"
    assert detect_family(sdxl, {}, "a").name == "sdxl"


def test_lora_passed_as_checkpoint_is_named_a_lora() -> None:
    shapes = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}
    with pytest.raises(CheckpointError, match=r"my_lora\.safetensors is a LoRA"):
        detect_family(shapes, {}, "my_lora.safetensors")


def test_embedding_passed_as_checkpoint_is_named_an_embedding() -> None:
    with pytest.raises(CheckpointError, match="textual-inversion embedding"):
        detect_family({"clip_l": (2, 768), "clip_g": (2, 1280)}, {}, "emb.safetensors")


def test_unknown_layout_lists_the_keys_found() -> None:
    with pytest.raises(CheckpointError, match=r"unknown layout \(first keys: 'foo.weight'"):
        detect_family({"foo.weight": (3,), "bar": (1,)}, {}, "x.safetensors")


def test_flux_is_refused_by_name() -> None:
    with pytest.raises(CheckpointError, match="Flux"):
        detect_family({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9, 3)}, {}, "flux.safetensors")


def test_checkpoint_without_vae_says_so() -> None:
    shapes = _sd1_shapes()
    del shapes["first_stage_model.encoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match="has no VAE"):
        detect_family(shapes, {}, "novae.safetensors")


def test_split_components_strips_prefixes_and_drops_ema_and_schedule() -> None:
    shapes = {
        **_sd1_shapes(),
        "model_ema.decay": (),
        "model_ema.diffusion_modelinput_blocks00weight": (32, 4, 3, 3),
        "alphas_cumprod": (1000,),
        "something_else": (1,),
    }
    parts, other = split_components(shapes, Arch.SD1)
    assert list(parts["unet"]) == ["input_blocks.0.0.weight"]
    assert list(parts["clip_l"]) == ["text_model.embeddings.token_embedding.weight"]
    assert list(parts["vae"]) == ["encoder.conv_in.weight"]
    assert other == ["something_else"]
