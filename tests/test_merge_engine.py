"""The streaming merge: formulas applied per key, the key rules, the checks made before any work,
cancel, progress and metadata."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.safetensors_writer import NotEnoughSpaceError
from lib_training.merge import CancelledError, MergeConfig, WriteProgress, merge

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."


def small_checkpoint(seed: int, in_channels: int = 4, dtype: torch.dtype = torch.float16, extra: dict | None = None):
    """A handful of tensors with the key names of an SD1 checkpoint (enough to be recognised as one)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    tensors = {
        U + "input_blocks.0.0.weight": rand(8, in_channels, 3, 3),
        U + "input_blocks.0.0.bias": rand(8),
        U + "input_blocks.1.1.proj_in.weight": rand(8, 8, 1, 1),
        U + "middle_block.1.proj_out.weight": rand(8, 8),
        U + "output_blocks.11.1.proj_out.weight": rand(8, 8),
        U + "time_embed.0.weight": rand(16, 8),
        U + "out.2.weight": rand(4, 8, 3, 3),
        TE + "encoder.layers.0.self_attn.q_proj.weight": rand(8, 8),
        TE + "embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None],
        "first_stage_model.encoder.conv_in.weight": rand(4, 3, 3, 3),
        "model_ema.decay": torch.tensor(0.9999),
        "alphas_cumprod": torch.linspace(1, 0, 10),
    }
    tensors.update(extra or {})
    return tensors


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def abc(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    return {x: write(folder / f"{x}.safetensors", small_checkpoint(seed)) for seed, x in enumerate("abc")}


def run(tmp_path: Path, name: str = "out", **settings) -> tuple[dict[str, torch.Tensor], object]:
    out = tmp_path / f"{name}.safetensors"
    result = merge(MergeConfig(out=str(out), **settings))
    return load_file(str(out)), result


def f32(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return tensors[key].float()


# --- formulas over whole checkpoints ------------------------------------------------------------


def test_weighted_sum_of_tiny_checkpoints_follows_the_formula_for_every_key(tmp_path: Path, tiny_checkpoints) -> None:
    from lib_training.model.tiny import make_tiny

    b_path = tmp_path / "b.safetensors"
    make_tiny("sd1", seed=1).save(b_path)
    a, b = load_file(str(tiny_checkpoints["sd1"])), load_file(str(b_path))
    out, result = run(tmp_path, a=str(tiny_checkpoints["sd1"]), b=str(b_path), alpha=0.3)
    assert set(out) == set(a)
    for key, value in out.items():
        if a[key].is_floating_point() and not key.endswith("position_ids"):
            assert value.dtype == torch.float16
            expected = (0.7 * a[key].float() + 0.3 * b[key].float()).half()
            assert torch.allclose(value.float(), expected.float(), rtol=1e-3, atol=1e-3), key
        else:
            assert torch.equal(value, a[key]), key
    assert result.merged == len(a) - 1  # all but position_ids


def test_add_difference_of_three_checkpoints_follows_the_formula(tmp_path: Path, abc) -> None:
    out, _ = run(tmp_path, method="add_difference", alpha=0.6, dtype="fp32", **{k: str(v) for k, v in abc.items()})
    a, b, c = (load_file(str(abc[x])) for x in "abc")
    key = U + "middle_block.1.proj_out.weight"
    assert torch.allclose(out[key], a[key].float() + 0.6 * (b[key].float() - c[key].float()))


def test_keys_outside_the_components_and_integer_keys_are_copied_from_a_unconverted(tmp_path: Path, abc) -> None:
    out, _ = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), alpha=0.5, prune_ema=False)
    a = load_file(str(abc["a"]))
    for key in ("alphas_cumprod", "model_ema.decay", TE + "embeddings.position_ids"):
        assert out[key].dtype == a[key].dtype, key  # fp32 schedule buffers stay fp32
        assert torch.equal(out[key], a[key]), key


# --- checks before any work -----------------------------------------------------------------------


def test_a_family_mismatch_is_refused_before_any_output(tmp_path: Path, tiny_checkpoints) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=r"model B \(tiny-sdxl.safetensors\) is SDXL but model A .* is SD1"):
        merge(MergeConfig(a=str(tiny_checkpoints["sd1"]), b=str(tiny_checkpoints["sdxl"]), out=str(out)))
    assert os.listdir(tmp_path) == []


def test_a_shape_mismatch_outside_the_input_channels_is_refused(tmp_path: Path, abc) -> None:
    bad = small_checkpoint(1, extra={U + "middle_block.1.proj_out.weight": torch.zeros(8, 9, dtype=torch.float16)})
    b = write(tmp_path / "bad.safetensors", bad)
    with pytest.raises(
        CheckpointError, match=r"middle_block.1.proj_out.weight has shape \[8, 8\] in model A and \[8, 9\]"
    ):
        merge(MergeConfig(a=str(abc["a"]), b=str(b), out=str(tmp_path / "out.safetensors")))
    assert not (tmp_path / "out.safetensors").exists()


def test_a_method_without_its_models_is_refused(tmp_path: Path, abc) -> None:
    with pytest.raises(ConfigError, match="add_difference method needs model C"):
        merge(
            MergeConfig(method="add_difference", a=str(abc["a"]), b=str(abc["b"]), out=str(tmp_path / "o.safetensors"))
        )


def test_an_existing_output_is_not_replaced_unless_asked(tmp_path: Path, abc) -> None:
    out = write(tmp_path / "o.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(ConfigError, match="exists"):
        merge(MergeConfig(a=str(abc["a"]), b=str(abc["b"]), out=str(out)))
    merge(MergeConfig(a=str(abc["a"]), b=str(abc["b"]), out=str(out), overwrite=True))
    assert U + "out.2.weight" in load_file(str(out))


def test_not_enough_disk_space_is_refused_before_writing(tmp_path: Path, abc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))  # type: ignore[attr-defined]
    with pytest.raises(
        NotEnoughSpaceError, match=r"the output needs [\d.]+ kB \(and 16.78 MB to spare\) and only 1.00 kB are free"
    ):
        merge(MergeConfig(a=str(abc["a"]), b=str(abc["b"]), out=str(tmp_path / "out.safetensors")))
    assert not (tmp_path / "out.safetensors").exists()


# --- inpainting / instruct-pix2pix ----------------------------------------------------------------


@pytest.mark.parametrize(("channels", "flag"), [(9, "is_inpainting"), (8, "is_instruct_pix2pix")])
def test_extra_input_channels_of_a_are_kept_and_the_first_four_merged(tmp_path: Path, channels: int, flag: str) -> None:
    a = write(tmp_path / "a.safetensors", small_checkpoint(0, in_channels=channels))
    b = write(tmp_path / "b.safetensors", small_checkpoint(1))
    out, result = run(tmp_path, a=str(a), b=str(b), alpha=0.5, dtype="fp32")
    key = U + "input_blocks.0.0.weight"
    wa, wb = load_file(str(a))[key].float(), load_file(str(b))[key].float()
    assert out[key].shape == (8, channels, 3, 3)
    assert torch.allclose(out[key][:, :4], 0.5 * wa[:, :4] + 0.5 * wb)
    assert torch.equal(out[key][:, 4:], wa[:, 4:])
    assert json.loads(result.metadata["sd_merge_recipe"])[flag] is True


def test_an_inpainting_model_in_b_is_refused(tmp_path: Path) -> None:
    a = write(tmp_path / "a.safetensors", small_checkpoint(0))
    b = write(tmp_path / "b.safetensors", small_checkpoint(1, in_channels=9))
    with pytest.raises(CheckpointError, match="Put the inpainting or instruct-pix2pix model in A"):
        merge(MergeConfig(a=str(a), b=str(b), out=str(tmp_path / "out.safetensors")))


# --- which keys, which ratios -----------------------------------------------------------------------


def test_include_merges_only_matching_keys(tmp_path: Path, abc) -> None:
    out, _ = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), alpha=1.0, include=r"middle_block")
    a, b = load_file(str(abc["a"])), load_file(str(abc["b"]))
    assert torch.equal(out[U + "middle_block.1.proj_out.weight"], b[U + "middle_block.1.proj_out.weight"])
    assert torch.equal(out[U + "out.2.weight"], a[U + "out.2.weight"])


def test_exclude_copies_matching_keys_from_a(tmp_path: Path, abc) -> None:
    out, _ = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), alpha=1.0, exclude=r"^cond_stage_model\.")
    a, b = load_file(str(abc["a"])), load_file(str(abc["b"]))
    key = TE + "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[key], a[key])
    assert torch.equal(out[U + "out.2.weight"], b[U + "out.2.weight"])


def test_discard_leaves_matching_keys_out(tmp_path: Path, abc) -> None:
    out, _ = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), discard=r"time_embed|alphas")
    assert not any("time_embed" in k or "alphas" in k for k in out)
    assert U + "out.2.weight" in out


def test_ema_weights_are_pruned_by_default(tmp_path: Path, abc) -> None:
    out, _ = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]))
    assert not any(k.startswith("model_ema.") for k in out)


def test_block_weights_set_the_ratio_of_each_block(tmp_path: Path, abc) -> None:
    values = ["0"] * 26
    values[0] = "1"  # BASE: the text encoder from B
    values[2] = "1"  # IN01 from B
    values[25] = "0.25"  # OUT11
    out, _ = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), alpha=0.5, blocks=",".join(values), dtype="fp32")
    a, b = load_file(str(abc["a"])), load_file(str(abc["b"]))
    for key, ratio in [
        (TE + "encoder.layers.0.self_attn.q_proj.weight", 1.0),
        (U + "input_blocks.1.1.proj_in.weight", 1.0),
        (U + "middle_block.1.proj_out.weight", 0.0),
        (U + "output_blocks.11.1.proj_out.weight", 0.25),
        (U + "out.2.weight", 0.25),  # the final layers go with OUT11
        (U + "time_embed.0.weight", 0.0),  # the time embedding goes with IN00
        ("first_stage_model.encoder.conv_in.weight", 0.5),  # no block: alpha
    ]:
        assert torch.allclose(out[key], (1 - ratio) * a[key].float() + ratio * b[key].float()), key


def test_component_ratios_replace_alpha_for_their_component(tmp_path: Path, abc) -> None:
    out, _ = run(
        tmp_path, a=str(abc["a"]), b=str(abc["b"]), alpha=0.5, unet_alpha=0.0, text_encoder_alpha=1.0, vae_alpha=0.25,
        dtype="fp32",
    )  # fmt: skip
    a, b = load_file(str(abc["a"])), load_file(str(abc["b"]))
    te, vae = TE + "encoder.layers.0.self_attn.q_proj.weight", "first_stage_model.encoder.conv_in.weight"
    assert torch.equal(out[U + "out.2.weight"], a[U + "out.2.weight"].float())
    assert torch.equal(out[te], b[te].float())
    assert torch.allclose(out[vae], 0.75 * a[vae].float() + 0.25 * b[vae].float())


def test_keys_missing_from_b_are_copied_from_a_with_a_warning(tmp_path: Path, abc) -> None:
    partial = small_checkpoint(1)
    del partial[U + "out.2.weight"]
    b = write(tmp_path / "partial.safetensors", partial)
    out, result = run(tmp_path, a=str(abc["a"]), b=str(b), alpha=1.0)
    assert torch.equal(out[U + "out.2.weight"], load_file(str(abc["a"]))[U + "out.2.weight"])
    assert any("1 keys of model A are missing" in w for w in result.warnings)


def test_output_dtype_applies_to_float_tensors_only(tmp_path: Path, abc) -> None:
    out, _ = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), dtype="bf16")
    assert out[U + "out.2.weight"].dtype == torch.bfloat16
    assert out[TE + "embeddings.position_ids"].dtype == torch.int64


def test_a_baked_vae_replaces_the_vae_weights(tmp_path: Path, abc, tiny_checkpoints) -> None:
    vae_only = {
        k.removeprefix("first_stage_model."): v
        for k, v in load_file(str(tiny_checkpoints["sd1"])).items()
        if k.startswith("first_stage_model.")
    }
    vae = write(tmp_path / "vae.safetensors", vae_only)
    out, result = run(tmp_path, method="none", a=str(abc["a"]), vae=str(vae), dtype="fp32")
    assert {k for k in out if k.startswith("first_stage_model.")} == {"first_stage_model." + k for k in vae_only}
    for key, value in vae_only.items():
        assert torch.equal(out["first_stage_model." + key], value.float())
    assert json.loads(result.metadata["sd_merge_recipe"])["bake_in_vae"] == "vae.safetensors"


def test_a_pickled_input_is_loaded_whole_and_said_so(tmp_path: Path, abc) -> None:
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": load_file(str(abc["b"]))}, ckpt)
    out, result = run(tmp_path, a=str(abc["a"]), b=str(ckpt), alpha=1.0)
    assert torch.equal(out[U + "out.2.weight"], load_file(str(abc["b"]))[U + "out.2.weight"])
    assert any("b.ckpt) is a pickle" in w for w in result.warnings)


def test_the_merged_tiny_model_loads_as_a_checkpoint(tmp_path: Path, tiny_checkpoints) -> None:
    from lib_training.model.standalone import load_model

    out = tmp_path / "merged.safetensors"
    merge(MergeConfig(method="slerp", a=str(tiny_checkpoints["sdxl"]), b=str(tiny_checkpoints["sdxl"]), out=str(out)))
    model = load_model(out)
    assert model.family.arch.value == "sdxl"


# --- cancel and progress ----------------------------------------------------------------------------


def test_cancel_leaves_neither_output_nor_temporary_file(tmp_path: Path, abc) -> None:
    cancel = threading.Event()
    out = tmp_path / "out.safetensors"
    with pytest.raises(CancelledError):
        merge(
            MergeConfig(a=str(abc["a"]), b=str(abc["b"]), out=str(out)), progress=lambda p: cancel.set(), cancel=cancel
        )
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_progress_counts_the_output_bytes_up_to_the_total(tmp_path: Path, abc) -> None:
    reports: list[WriteProgress] = []
    out = tmp_path / "out.safetensors"
    merge(MergeConfig(a=str(abc["a"]), b=str(abc["b"]), out=str(out)), progress=reports.append)
    final = reports[-1]
    assert final.done_bytes == final.total_bytes and final.done_tensors == final.total_tensors
    assert final.fraction == 1.0 and final.eta == 0.0
    with safe_open(str(out), framework="pt") as f:
        assert final.total_tensors == len(list(f.keys()))


# --- metadata ---------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_metadata_records_the_recipe_and_the_tree_of_merged_models(tmp_path: Path, abc) -> None:
    first = tmp_path / "first.safetensors"
    merge(MergeConfig(a=str(abc["a"]), b=str(abc["b"]), alpha=0.3, out=str(first)))
    second = tmp_path / "second.safetensors"
    result = merge(
        MergeConfig(method="add_difference", a=str(first), b=str(abc["c"]), c=str(abc["a"]), out=str(second))
    )
    with safe_open(str(second), framework="pt") as f:
        metadata = f.metadata()
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["interp_method"] == "add_difference"
    assert recipe["primary_model_hash"] == sha256_of(first)
    assert recipe["secondary_model_hash"] == sha256_of(abc["c"])
    assert recipe["tertiary_model_hash"] == sha256_of(abc["a"])
    models = json.loads(metadata["sd_merge_models"])
    assert set(models) == {sha256_of(first), sha256_of(abc["a"]), sha256_of(abc["b"]), sha256_of(abc["c"])}
    assert models[sha256_of(first)]["name"] == "first.safetensors"
    assert models[sha256_of(first)]["sd_merge_recipe"]["multiplier"] == 0.3  # the parent's recipe, as JSON
    assert models[sha256_of(abc["b"])]["sd_merge_recipe"] is None
    assert metadata["modelspec.merged_from"] == "first, c, a"
    assert metadata["modelspec.title"] == "second"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert result.input_sha256 == {"a": sha256_of(first), "b": sha256_of(abc["c"]), "c": sha256_of(abc["a"])}


def test_modelspec_hash_is_the_sha256_of_the_tensor_data(tmp_path: Path, abc) -> None:
    out = tmp_path / "out.safetensors"
    result = merge(MergeConfig(a=str(abc["a"]), b=str(abc["b"]), out=str(out)))
    data = out.read_bytes()
    data = data[8 + int.from_bytes(data[:8], "little") :]
    assert result.metadata["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()


def test_inputs_are_not_hashed_when_asked_not_to_or_when_known(tmp_path: Path, abc) -> None:
    _, result = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), hash_inputs=False)
    recipe = json.loads(result.metadata["sd_merge_recipe"])
    assert recipe["primary_model_hash"] is None and json.loads(result.metadata["sd_merge_models"]) == {}
    known = {str(abc["a"]): "1" * 64, str(abc["b"]): "2" * 64}
    result = merge(
        MergeConfig(a=str(abc["a"]), b=str(abc["b"]), out=str(tmp_path / "k.safetensors")), known_sha256=known
    )
    assert set(json.loads(result.metadata["sd_merge_models"])) == {"1" * 64, "2" * 64}


@pytest.mark.parametrize(("stated", "expected"), [({"modelspec.prediction_type": "v"}, "v"), ({}, None)])
def test_the_prediction_type_is_written_only_when_model_a_states_it(tmp_path: Path, stated, expected) -> None:
    def sd2(seed: int) -> dict[str, torch.Tensor]:
        tensors = small_checkpoint(seed)
        tensors["cond_stage_model.model.ln_final.weight"] = tensors.pop(TE + "encoder.layers.0.self_attn.q_proj.weight")
        del tensors[TE + "embeddings.position_ids"]
        return tensors

    a = write(tmp_path / "a.safetensors", sd2(0), stated)
    b = write(tmp_path / "b.safetensors", sd2(1))
    _, result = run(tmp_path, a=str(a), b=str(b))
    assert result.metadata.get("modelspec.prediction_type") == expected
    assert result.metadata["modelspec.architecture"].startswith("stable-diffusion-v2")


def test_model_a_metadata_is_kept_without_its_stale_hashes(tmp_path: Path) -> None:
    metadata = {"ss_tag": "kept", "modelspec.hash_sha256": "0xstale", "sshs_model_hash": "stale"}
    a = write(tmp_path / "a.safetensors", small_checkpoint(0), metadata)
    b = write(tmp_path / "b.safetensors", small_checkpoint(1))
    _, result = run(tmp_path, a=str(a), b=str(b))
    assert result.metadata["ss_tag"] == "kept"
    assert "sshs_model_hash" not in result.metadata
    assert result.metadata["modelspec.hash_sha256"] != "0xstale"


# --- model configs ------------------------------------------------------------------------------------


def test_the_first_inputs_yaml_config_is_copied_beside_the_output(tmp_path: Path, abc) -> None:
    abc["b"].with_suffix(".yaml").write_text("model: {target: from-b}\n")
    _, result = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), alpha=0.5)
    assert result.path.with_suffix(".yaml").read_text() == "model: {target: from-b}\n"


def test_no_config_is_written_when_asked_not_to_or_when_no_input_has_one(tmp_path: Path, abc) -> None:
    _, result = run(tmp_path, a=str(abc["a"]), b=str(abc["b"]), alpha=0.5)
    assert not result.path.with_suffix(".yaml").exists()
    abc["a"].with_suffix(".yaml").write_text("a\n")
    _, result = run(tmp_path, "other", a=str(abc["a"]), b=str(abc["b"]), alpha=0.5, copy_config=False)
    assert not result.path.with_suffix(".yaml").exists()
