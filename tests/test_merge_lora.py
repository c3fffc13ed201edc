"""LoRA tools: bake into a checkpoint, extract from tuned minus base, resize; kohya file details."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_training.errors import CheckpointError
from lib_training.formats.family import Arch
from lib_training.formats.lora_keys import lora_targets, targets_by_name
from lib_training.merge import (
    LoraBakeConfig,
    LoraExtractConfig,
    LoraResizeConfig,
    LoraSpec,
    bake_loras,
    extract_lora,
    resize_lora,
)
from lib_training.merge.lora_extract import low_rank
from lib_training.merge.lora_file import LoraModule, legacy_hash_of, lora_tensors, read_lora, write_lora

SD1_MODULES = (
    "lora_unet_down_blocks_0_attentions_0_proj_in",  # 1x1 conv in SD1
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
    "lora_unet_down_blocks_0_resnets_1_conv2",  # 3x3 conv (LoCon)
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_2_mlp_fc1",
)


def random_lora(shapes: dict, arch: Arch, names: tuple[str, ...], rank: int, alpha: float, seed: int = 0):
    """kohya modules of random factors for `names`, sized for the checkpoint of `shapes`."""
    generator = torch.Generator().manual_seed(seed)
    index = targets_by_name(lora_targets(shapes, arch))
    modules = {}
    for name in names:
        out_features, *rest = index[name].shape
        down = torch.randn(rank, *rest, generator=generator) * 0.1
        up = torch.randn(out_features, rank, *([1, 1] if len(rest) == 3 else []), generator=generator) * 0.1
        modules[name] = LoraModule(name, down, up, alpha)
    return modules


def save_lora(path: Path, modules: dict[str, LoraModule], metadata: dict[str, str] | None = None) -> Path:
    save_file(lora_tensors(modules, torch.float32), str(path), metadata=metadata)
    return path


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return ((found - expected).norm() / expected.norm()).item()


@pytest.fixture
def sd1_lora(tmp_path: Path, tiny_checkpoints) -> tuple[Path, dict[str, LoraModule]]:
    modules = random_lora(shapes_of(tiny_checkpoints["sd1"]), Arch.SD1, SD1_MODULES, rank=4, alpha=2.0)
    return save_lora(tmp_path / "style.safetensors", modules), modules


# --- bake --------------------------------------------------------------------------------------------


def test_bake_then_extract_recovers_the_lora_update(tmp_path: Path, tiny_checkpoints, sd1_lora) -> None:
    lora, modules = sd1_lora
    baked = tmp_path / "baked.safetensors"
    bake_loras(
        LoraBakeConfig(model=str(tiny_checkpoints["sd1"]), loras=[LoraSpec(str(lora))], out=str(baked), dtype="fp32")
    )
    extracted = tmp_path / "extracted.safetensors"
    result = extract_lora(
        LoraExtractConfig(
            base=str(tiny_checkpoints["sd1"]), tuned=str(baked), out=str(extracted), rank=4, conv_rank=4,
            clamp_quantile=1.0, dtype="fp32",
        )
    )  # fmt: skip
    found, _, _ = read_lora(extracted)
    for name, module in modules.items():
        # the update is rank 4, so a rank-4 SVD recovers it up to fp32 rounding of W + update - W
        assert relative_error(found[name].delta(), module.delta()) < 1e-4, name
    untouched = [m for name, m in found.items() if name not in modules]
    assert untouched and all(m.delta().abs().max() < 1e-5 for m in untouched)
    assert result.modules == len(found)


def test_clamping_caps_both_factors_at_the_quantile_of_their_values() -> None:
    difference = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    up, down = low_rank(difference, 16)
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    clamped_up, clamped_down = low_rank(difference, 16, clamp_quantile=0.99)
    assert torch.allclose(clamped_up, up.clamp(-limit, limit), atol=1e-6)
    assert torch.allclose(clamped_down, down.clamp(-limit, limit), atol=1e-6)
    changed = (clamped_up.abs() < up.abs()).sum() + (clamped_down.abs() < down.abs()).sum()
    assert 0 < changed <= 0.03 * (up.numel() + down.numel())  # about 1% at each end


def test_bake_adds_strength_times_the_update_to_the_weight(tmp_path: Path, tiny_checkpoints, sd1_lora) -> None:
    lora, modules = sd1_lora
    base = load_file(str(tiny_checkpoints["sd1"]))
    out = tmp_path / "baked.safetensors"
    config = LoraBakeConfig(
        model=str(tiny_checkpoints["sd1"]), loras=[LoraSpec(str(lora), 0.5)], out=str(out), dtype="fp32"
    )
    result = bake_loras(config)
    baked = load_file(str(out))
    index = targets_by_name(lora_targets(shapes_of(tiny_checkpoints["sd1"]), Arch.SD1))
    for name, module in modules.items():
        key = index[name].key
        assert torch.allclose(baked[key], base[key] + 0.5 * module.delta().reshape(base[key].shape), atol=1e-6), name
    unchanged = "model.diffusion_model.input_blocks.2.1.proj_out.weight"
    assert torch.equal(baked[unchanged], base[unchanged])
    assert (result.modules, result.weights) == (len(modules), len(modules))


def test_block_weights_of_a_lora_scale_its_modules_per_block(tmp_path: Path, tiny_checkpoints, sd1_lora) -> None:
    lora, _ = sd1_lora
    blocks = ["1"] * 26
    blocks[0] = "0"  # BASE: the text encoder
    blocks[2] = "0"  # IN01: down_blocks_0_attentions_0
    out = tmp_path / "baked.safetensors"
    spec = LoraSpec(str(lora), 1.0, ",".join(blocks))
    bake_loras(LoraBakeConfig(model=str(tiny_checkpoints["sd1"]), loras=[spec], out=str(out), dtype="fp32"))
    base, baked = load_file(str(tiny_checkpoints["sd1"])), load_file(str(out))
    index = targets_by_name(lora_targets(shapes_of(tiny_checkpoints["sd1"]), Arch.SD1))
    for name in SD1_MODULES:
        key = index[name].key
        held_back = name.startswith("lora_te_") or "down_blocks_0_attentions_0" in name
        assert torch.equal(baked[key], base[key]) == held_back, name


def test_baking_into_open_clip_q_k_v_changes_only_the_module_rows(tmp_path: Path, tiny_checkpoints) -> None:
    shapes = shapes_of(tiny_checkpoints["sdxl"])
    name = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"
    modules = random_lora(shapes, Arch.SDXL, (name,), rank=2, alpha=2.0)
    lora = save_lora(tmp_path / "xl.safetensors", modules)
    out = tmp_path / "baked.safetensors"
    bake_loras(
        LoraBakeConfig(model=str(tiny_checkpoints["sdxl"]), loras=[LoraSpec(str(lora))], out=str(out), dtype="fp32")
    )
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    base, baked = load_file(str(tiny_checkpoints["sdxl"]))[key], load_file(str(out))[key]
    width = base.shape[1]
    assert torch.equal(baked[:width], base[:width]) and torch.equal(baked[2 * width :], base[2 * width :])
    assert torch.allclose(baked[width : 2 * width], base[width : 2 * width] + modules[name].delta(), atol=1e-6)


def test_several_loras_add_up(tmp_path: Path, tiny_checkpoints) -> None:
    shapes = shapes_of(tiny_checkpoints["sd1"])
    name = SD1_MODULES[1]
    first = random_lora(shapes, Arch.SD1, (name,), rank=2, alpha=1.0, seed=1)
    second = random_lora(shapes, Arch.SD1, (name,), rank=3, alpha=3.0, seed=2)
    specs = [
        LoraSpec(str(save_lora(tmp_path / "one.safetensors", first)), 1.0),
        LoraSpec(str(save_lora(tmp_path / "two.safetensors", second)), -0.5),
    ]
    out = tmp_path / "baked.safetensors"
    result = bake_loras(LoraBakeConfig(model=str(tiny_checkpoints["sd1"]), loras=specs, out=str(out), dtype="fp32"))
    key = targets_by_name(lora_targets(shapes, Arch.SD1))[name].key
    expected = load_file(str(tiny_checkpoints["sd1"]))[key] + first[name].delta() - 0.5 * second[name].delta()
    assert torch.allclose(load_file(str(out))[key], expected, atol=1e-6)
    recipe = json.loads(result.metadata["sd_merge_recipe"])
    assert [entry["strength"] for entry in recipe["loras"]] == [1.0, -0.5]
    assert result.metadata["modelspec.merged_from"] == "tiny random sd1 (seed 0), one, two"


def test_a_lora_for_another_family_is_refused(tmp_path: Path, tiny_checkpoints) -> None:
    modules = random_lora(
        shapes_of(tiny_checkpoints["sdxl"]), Arch.SDXL, ("lora_te1_text_model_encoder_layers_0_mlp_fc1",), 2, 2.0
    )
    lora = save_lora(tmp_path / "xl.safetensors", modules)
    with pytest.raises(CheckpointError, match="made for another model family"):
        bake_loras(
            LoraBakeConfig(
                model=str(tiny_checkpoints["sd1"]), loras=[LoraSpec(str(lora))], out=str(tmp_path / "o.safetensors")
            )
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_other_adapter_types_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(CheckpointError, match="is a LoHa adapter"):
        read_lora(path)


# --- extract -----------------------------------------------------------------------------------------


def test_extracted_lora_carries_kohya_metadata_and_hashes(tmp_path: Path, tiny_checkpoints, sd1_lora) -> None:
    lora, _ = sd1_lora
    baked = tmp_path / "baked.safetensors"
    bake_loras(LoraBakeConfig(model=str(tiny_checkpoints["sd1"]), loras=[LoraSpec(str(lora))], out=str(baked)))
    out = tmp_path / "my_style.safetensors"
    extract_lora(LoraExtractConfig(base=str(tiny_checkpoints["sd1"]), tuned=str(baked), out=str(out), rank=4))
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4")
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "my_style"
    data = out.read_bytes()
    data_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert metadata["sshs_model_hash"] == data_hash and metadata["modelspec.hash_sha256"] == "0x" + data_hash
    assert all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in keys)
    assert not any(k.startswith("lora_unet_input_blocks") for k in keys)  # SD1 LoRAs use diffusers names


def test_an_unchanged_text_encoder_is_left_out_of_the_extracted_lora(tmp_path: Path, tiny_checkpoints) -> None:
    modules = random_lora(shapes_of(tiny_checkpoints["sd1"]), Arch.SD1, SD1_MODULES[:2], rank=2, alpha=2.0)
    lora = save_lora(tmp_path / "unet_only.safetensors", modules)
    baked = tmp_path / "baked.safetensors"
    bake_loras(
        LoraBakeConfig(model=str(tiny_checkpoints["sd1"]), loras=[LoraSpec(str(lora))], out=str(baked), dtype="fp32")
    )
    out = tmp_path / "extracted.safetensors"
    result = extract_lora(LoraExtractConfig(base=str(tiny_checkpoints["sd1"]), tuned=str(baked), out=str(out), rank=2))
    found, _, _ = read_lora(out)
    assert not any(name.startswith("lora_te_") for name in found)
    assert any("clip_l" in warning for warning in result.warnings)


def test_legacy_hash_is_kohyas_hash_of_the_file_with_only_ss_metadata(tmp_path: Path) -> None:
    tensors = {"a.lora_up.weight": torch.randn(600, 300), "a.lora_down.weight": torch.randn(300, 600)}
    metadata = {"ss_network_dim": "300", "ss_note": "x" * 50}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    window = (tmp_path / "ref.safetensors").read_bytes()[0x100000:0x110000]
    assert legacy_hash_of(tensors, metadata) == hashlib.sha256(window).hexdigest()[:8]


def test_write_lora_hashes_survive_a_reload(tmp_path: Path) -> None:
    modules = {"lora_unet_x": LoraModule("lora_unet_x", torch.randn(2, 5), torch.randn(3, 2), 1.0)}
    result = write_lora(tmp_path / "x.safetensors", lora_tensors(modules, torch.float16), {"ss_network_dim": "2"})
    found, metadata, _ = read_lora(tmp_path / "x.safetensors")
    assert metadata["sshs_model_hash"] == result.data_sha256
    assert torch.allclose(found["lora_unet_x"].delta(), modules["lora_unet_x"].delta(), atol=1e-2)


# --- resize ------------------------------------------------------------------------------------------


def low_rank_module(name: str, out_features: int, in_features: int, stored: int, true_rank: int, alpha: float):
    generator = torch.Generator().manual_seed(0)
    up = torch.randn(out_features, true_rank, generator=generator) @ torch.randn(true_rank, stored, generator=generator)
    return LoraModule(name, torch.randn(stored, in_features, generator=generator), up, alpha)


def test_resize_to_the_true_rank_keeps_the_update_and_its_scale(tmp_path: Path) -> None:
    module = low_rank_module("lora_unet_x", 12, 10, stored=8, true_rank=2, alpha=4.0)
    lora = save_lora(
        tmp_path / "r8.safetensors", {module.name: module}, {"ss_network_dim": "8", "ss_network_alpha": "4"}
    )
    out = tmp_path / "r2.safetensors"
    result = resize_lora(LoraResizeConfig(lora=str(lora), out=str(out), rank=2, dtype="fp32"))
    found, metadata, _ = read_lora(out)
    assert found[module.name].rank == 2
    assert found[module.name].scale == pytest.approx(module.scale)
    assert relative_error(found[module.name].delta(), module.delta()) < 1e-5
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "1")
    assert result.modules == 1


def test_resize_keeps_the_largest_singular_directions(tmp_path: Path) -> None:
    module = low_rank_module("lora_unet_x", 12, 10, stored=8, true_rank=8, alpha=8.0)
    lora = save_lora(tmp_path / "r8.safetensors", {module.name: module})
    out = tmp_path / "r3.safetensors"
    resize_lora(LoraResizeConfig(lora=str(lora), out=str(out), rank=3, dtype="fp32"))
    found, _, _ = read_lora(out)
    s = torch.linalg.svdvals(module.delta())
    best = (s[3:] ** 2).sum().sqrt() / s.norm()  # the error of the best rank-3 approximation
    assert relative_error(found[module.name].delta(), module.delta()) == pytest.approx(best.item(), rel=1e-4)


def test_dynamic_resize_by_frobenius_fraction_finds_the_true_rank(tmp_path: Path) -> None:
    module = low_rank_module("lora_unet_x", 12, 10, stored=8, true_rank=3, alpha=8.0)
    lora = save_lora(tmp_path / "r8.safetensors", {module.name: module})
    out = tmp_path / "dyn.safetensors"
    resize_lora(LoraResizeConfig(lora=str(lora), out=str(out), rank=8, dynamic_method="sv_fro", dynamic_param=0.99999))
    found, metadata, _ = read_lora(out)
    assert found[module.name].rank == 3
    assert metadata["ss_network_dim"] == "Dynamic"
