"""The `merge` and `lora` subcommands, as the main CLI registers them."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_training.errors import ConfigError
from lib_training.merge.cli import add_merge_parsers, config_from_args
from lib_training.merge.config import LoraSpec, MergeConfig
from lib_training.merge.lora_file import LoraModule, lora_tensors
from lib_training.options import describe


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lib_training")
    add_merge_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_merge_command_takes_the_options_of_the_issue(tmp_path: Path, tiny_checkpoints, capsys) -> None:
    out = tmp_path / "out.safetensors"
    args = parse(
        "merge", "--method", "weighted_sum", "--a", str(tiny_checkpoints["sd1"]), "--b", str(tiny_checkpoints["sd1"]),
        "--alpha", "0.3", "--blocks", "in_to_out", "--dtype", "bf16", "--out", str(out),
    )  # fmt: skip
    args.run(args)
    assert "wrote" in capsys.readouterr().out
    assert load_file(str(out))["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16


def test_every_merge_setting_is_an_option_with_its_default() -> None:
    args = parse("merge", "--a", "a.safetensors", "--out", "o.safetensors")
    assert config_from_args(MergeConfig, args) == MergeConfig(a="a.safetensors", out="o.safetensors")
    for info in describe(MergeConfig):
        assert hasattr(args, info.name), info.name


def test_boolean_settings_can_be_turned_off(tmp_path: Path) -> None:
    args = parse("merge", "--a", "a.safetensors", "--out", "o.safetensors", "--no-prune-ema", "--weights-clip")
    assert args.prune_ema is False and args.weights_clip is True


def test_unknown_methods_are_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        parse("merge", "--method", "average", "--a", "a.safetensors", "--out", "o.safetensors")


def test_lora_bake_pairs_strengths_with_loras_in_order(tmp_path: Path, tiny_checkpoints, monkeypatch) -> None:
    seen = {}

    def fake_bake(config, progress):
        seen["config"] = config
        return SimpleNamespace(path=config.out, seconds=0.0, data_sha256="0" * 64, warnings=[], modules=2)

    monkeypatch.setattr("lib_training.merge.lora_bake.bake_loras", fake_bake)
    args = parse(
        "lora", "bake", "--model", "m.safetensors", "--lora", "one.safetensors", "--lora", "two.safetensors",
        "--strength", "0.5", "--lora-blocks", "outputs", "--out", str(tmp_path / "o.safetensors"),
    )  # fmt: skip
    args.run(args)
    assert seen["config"].loras == [LoraSpec("one.safetensors", 0.5, "outputs"), LoraSpec("two.safetensors", 1.0, "")]


def test_more_strengths_than_loras_is_an_error(tmp_path: Path) -> None:
    args = parse("lora", "bake", "--model", "m", "--lora", "x", "--strength", "1", "--strength", "2", "--out", "o")
    with pytest.raises(ConfigError, match="at most one --strength"):
        args.run(args)


def test_lora_resize_and_extract_commands_write_loras(tmp_path: Path, tiny_checkpoints) -> None:
    module = LoraModule("lora_unet_x", torch.randn(4, 6), torch.randn(5, 4), 4.0)
    lora = tmp_path / "l.safetensors"
    save_file(lora_tensors({"lora_unet_x": module}, torch.float32), str(lora))
    args = parse("lora", "resize", "--lora", str(lora), "--rank", "2", "--out", str(tmp_path / "r.safetensors"))
    args.run(args)
    assert load_file(str(tmp_path / "r.safetensors"))["lora_unet_x.lora_down.weight"].shape == (2, 6)
    out = tmp_path / "e.safetensors"
    args = parse(
        "lora", "extract", "--base", str(tiny_checkpoints["sd1"]), "--tuned", str(tiny_checkpoints["sd1"]),
        "--rank", "2", "--out", str(out),
    )  # fmt: skip
    args.run(args)
    assert out.exists()


def test_baking_a_full_checkpoint_given_as_a_lora_says_it_is_a_checkpoint(
    tmp_path: Path, tiny_checkpoints, capsys
) -> None:
    from lib_training.app.cli import main

    checkpoint = str(tiny_checkpoints["sd1"])
    code = main(["lora", "bake", "--model", checkpoint, "--lora", checkpoint, "--out", str(tmp_path / "o.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert "is a full checkpoint, not a LoRA" in err and "a a " not in err


def test_an_error_found_before_any_work_is_not_printed_after_a_progress_bar(tmp_path: Path, capsys) -> None:
    from lib_training.app.cli import main

    missing = str(tmp_path / "missing.safetensors")
    code = main(["merge", "--a", missing, "--b", missing, "--out", str(tmp_path / "o.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "merging" not in err


def test_merge_help_texts_are_sentences_like_the_training_ones() -> None:
    from lib_training.merge.config import LoraBakeConfig, LoraExtractConfig, LoraResizeConfig
    from lib_training.options import describe

    for cls in (MergeConfig, LoraSpec, LoraBakeConfig, LoraExtractConfig, LoraResizeConfig):
        for info in describe(cls):
            assert info.help[:1].isupper() and info.help.endswith("."), (cls.__name__, info.name, info.help)
