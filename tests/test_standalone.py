"""Loading and saving single-file checkpoints with our own model code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_training.errors import CheckpointError
from lib_training.formats.detection import PREDICTION_METADATA
from lib_training.formats.tensor_files import open_tensors, save_safetensors
from lib_training.model.standalone import load_model
from lib_training.model.tiny import make_tiny


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_tensors(path) as source:
        return source.load_all()


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_load_save_load_gives_identical_keys_and_tensors(arch: str, tiny_checkpoints, tmp_path: Path) -> None:
    first = load_model(tiny_checkpoints[arch])
    resaved = tmp_path / "again.safetensors"
    first.save(resaved)
    original, again = _file_tensors(tiny_checkpoints[arch]), _file_tensors(resaved)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    second = load_model(resaved)
    assert second.family == first.family


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_checkpoint_is_detected_as_its_family(arch: str, tiny_checkpoints) -> None:
    assert load_model(tiny_checkpoints[arch]).family.name == arch


def test_sd1_text_encoder_is_stored_in_hf_layout(tiny_checkpoints) -> None:
    with open_tensors(tiny_checkpoints["sd1"]) as source:
        keys = source.keys()
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert not any(".resblocks." in k for k in keys)


def test_sdxl_text_encoders_use_their_own_layouts(tiny_checkpoints) -> None:
    with open_tensors(tiny_checkpoints["sdxl"]) as source:
        keys = source.keys()
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys


def test_fp16_checkpoint_loads_in_the_requested_dtype(tiny_checkpoints, tmp_path: Path) -> None:
    half = tmp_path / "half.safetensors"
    load_model(tiny_checkpoints["sd1"]).save(half, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in _file_tensors(half).values() if t.is_floating_point())
    model = load_model(half, dtype=torch.bfloat16)
    assert next(model.unet_module.parameters()).dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16


def test_ckpt_with_nested_state_dict_and_ema_loads_like_the_safetensors(tiny_checkpoints, tmp_path: Path) -> None:
    tensors = _file_tensors(tiny_checkpoints["sd1"])
    ema = {"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(10)}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**tensors, **ema}, "global_step": 1}, ckpt)
    from_ckpt = load_model(ckpt).checkpoint_state_dict()
    assert from_ckpt.keys() == tensors.keys()
    assert all(torch.equal(from_ckpt[k], tensors[k]) for k in tensors)


def test_old_sd1_clip_keys_without_text_model_prefix_load(tiny_checkpoints, tmp_path: Path) -> None:
    prefix = "cond_stage_model.transformer.text_model."
    tensors = {
        k.replace(prefix, "cond_stage_model.transformer."): v for k, v in _file_tensors(tiny_checkpoints["sd1"]).items()
    }
    old = tmp_path / "old.safetensors"
    save_safetensors(old, tensors)
    reference = load_model(tiny_checkpoints["sd1"])
    loaded = load_model(old)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    a = reference.text_encoders[0].encode_embeddings(reference.text_encoders[0].token_embedding(ids), ids).hidden
    b = loaded.text_encoders[0].encode_embeddings(loaded.text_encoders[0].token_embedding(ids), ids).hidden
    assert torch.equal(a, b)


def test_prediction_type_is_kept_in_metadata(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    make_tiny("sd2-v").save(path)
    with open_tensors(path) as source:
        assert source.metadata[PREDICTION_METADATA] == "v"
    model = load_model(path)
    assert model.family.name == "sd2-v" and model.schedule.prediction == "v"


def test_prediction_override_wins_over_the_file(tiny_checkpoints) -> None:
    model = load_model(tiny_checkpoints["sd2"], prediction="v")
    assert model.family.name == "sd2-v"


def test_checkpoint_missing_a_unet_tensor_names_it(tiny_checkpoints, tmp_path: Path) -> None:
    tensors = _file_tensors(tiny_checkpoints["sd1"])
    del tensors["model.diffusion_model.out.2.weight"]
    broken = tmp_path / "broken.safetensors"
    save_safetensors(broken, tensors)
    with pytest.raises(CheckpointError, match=r"out\.2"):
        load_model(broken)


def test_lora_file_passed_as_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    save_safetensors(lora, {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32)})
    with pytest.raises(CheckpointError, match=r"style\.safetensors is a LoRA"):
        load_model(lora)


def test_loaded_model_is_frozen(tiny_sd1) -> None:
    assert not any(p.requires_grad for m in tiny_sd1.modules.values() for p in m.parameters())
