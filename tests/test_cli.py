"""The command line: make-tiny and generate, and how errors reach the user."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from lib_training.app.cli import main
from lib_training.model.standalone import load_model


def test_make_tiny_writes_a_loadable_checkpoint_of_the_family(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.safetensors"
    assert main(["make-tiny", "--arch", "sdxl", str(out), "--seed", "3"]) == 0
    assert "tiny random sdxl" in capsys.readouterr().out
    assert load_model(out).family.name == "sdxl"


def test_make_tiny_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    main(["make-tiny", "--arch", "sd1", str(a), "--seed", "1"])
    main(["make-tiny", "--arch", "sd1", str(b), "--seed", "1"])
    main(["make-tiny", "--arch", "sd1", str(c), "--seed", "2"])
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_generate_writes_a_png_of_the_requested_size(tiny_checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    code = main(
        ["generate", "--ckpt", str(tiny_checkpoints["sd1"]), "--prompt", "a cat", "--out", str(out),
         "--steps", "2", "--width", "64", "--height", "96", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (64, 96)


def test_user_errors_are_one_line_on_stderr_with_exit_status_2(tmp_path: Path, capsys) -> None:
    code = main(["generate", "--ckpt", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--out", "o.png"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: file not found") and "missing.safetensors" in err


def test_help_describes_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--ckpt", "--prompt", "--negative", "--seed", "--steps", "--cfg", "--sampler", "--device"):
        assert option in text


def test_a_bad_learning_rate_is_refused_in_under_a_second_without_loading_the_model(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import lib_training.model.standalone as standalone

    def load_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad option")

    monkeypatch.setattr(standalone, "load_model", load_model)
    data = tmp_path / "images"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(data / "a.png")
    start = time.perf_counter()
    code = main(
        ["train", "embedding", "--ckpt", str(tmp_path / "slow.safetensors"), "--out", str(tmp_path / "out"),
         "--name", "zqx", "--data", str(data), "--lr", "-1"]
    )  # fmt: skip
    assert time.perf_counter() - start < 1.0
    assert code == 2
    err = capsys.readouterr().err
    assert "--lr:" in err and "learning rate" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "1e38"])
def test_learning_rates_that_cannot_train_end_in_a_message_not_a_traceback(tmp_path: Path, capsys, lr) -> None:
    code = main(["train", "embedding", "--ckpt", "x.safetensors", "--out", str(tmp_path), "--name", "zqx",
                 "--data", str(tmp_path), "--lr", lr])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid settings:") and "--lr:" in err and "Traceback" not in err


def test_train_help_shows_ranges_as_the_ui_does_and_no_double_negative_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "embedding", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(1 to 10,000,000)" in text and "1e+07" not in text and "[1.." not in text
    assert "--no-upscale" in text and "--no-no-upscale" not in text
    assert "a multiple of 8" in text


def test_no_upscale_is_set_by_its_flag() -> None:
    from lib_training.app.cli import build_parser

    args = build_parser().parse_args(["train", "embedding", "--ckpt", "c", "--out", "o", "--name", "n", "--data", "d"])
    assert args.no_upscale is None
    args = build_parser().parse_args(
        ["train", "embedding", "--ckpt", "c", "--out", "o", "--name", "n", "--data", "d", "--no-upscale"]
    )
    assert args.no_upscale is True
