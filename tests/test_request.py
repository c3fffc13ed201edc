"""One check of a training request before any work, shared by the UI, the API and the CLI: every bad
field is named at once, by its dotted name, with what to do instead."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lib_training.methods import spec_for
from lib_training.options import SettingsError
from lib_training.training.request import parse_request, request_errors

EMBEDDING = spec_for("embedding")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "0.png")
    return folder


def _body(images: Path, method=None, data=None, loop=None) -> dict:
    return {
        "method": {"name": "zqx", **(method or {})},
        "data": {"path": str(images), "size": 64, **(data or {})},
        "loop": {"steps": 10, **(loop or {})},
    }


def test_a_valid_request_parses(images) -> None:
    request = parse_request(EMBEDDING, _body(images))
    assert request.name == "zqx" and request.loop.steps == 10


def test_steps_learning_rate_and_path_are_all_reported_at_once(images) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_request(EMBEDDING, _body(images, data={"path": "/nonexistent/folder"}, loop={"steps": 0, "lr": "abc"}))
    errors = caught.value.errors
    assert set(errors) == {"loop.steps", "loop.lr", "data.path"}
    assert "'abc'" in errors["loop.lr"] and "not a number" in errors["loop.lr"]
    assert "does not exist" in errors["data.path"]


@pytest.mark.parametrize("lr", ["-1", "nan", "inf", "-inf", "1e38", "0.005:100, 1e9"])
def test_learning_rates_that_cannot_train_are_refused_with_a_message(images, lr) -> None:
    errors = request_errors(EMBEDDING, _body(images, loop={"lr": lr, "steps": 1000}))
    assert list(errors) == ["loop.lr"]
    assert "learning rate" in errors["loop.lr"]


def test_a_schedule_with_decreasing_steps_is_refused(images) -> None:
    errors = request_errors(EMBEDDING, _body(images, loop={"lr": "0.01:100, 0.001:50, 1e-4", "steps": 1000}))
    assert "steps must increase" in errors["loop.lr"]


def test_the_clipping_limit_is_checked_when_clipping_is_on(images) -> None:
    body = _body(images, loop={"clip_grad": "norm", "clip_grad_value": "one"})
    assert "gradient clipping limit" in request_errors(EMBEDDING, body)["loop.clip_grad_value"]
    body["loop"]["clip_grad"] = "none"
    assert request_errors(EMBEDDING, body) == {}


def test_warmup_longer_than_training_is_named(images) -> None:
    errors = request_errors(EMBEDDING, _body(images, loop={"lr_warmup_steps": 20, "lr_scheduler": "linear"}))
    assert list(errors) == ["loop.lr_warmup_steps"]


def test_a_file_or_a_folder_without_images_is_not_a_dataset(images, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    errors = request_errors(EMBEDDING, _body(images, data={"path": str(tmp_path / "notes.txt")}))
    assert "is a file, not a folder" in errors["data.path"]
    errors = request_errors(EMBEDDING, _body(images, data={"path": str(tmp_path)}))
    assert "contains no images" in errors["data.path"]


def test_an_empty_path_is_required(images) -> None:
    body = _body(images)
    del body["data"]["path"]
    assert request_errors(EMBEDDING, body)["data.path"] == "required"


def test_an_unknown_template_is_named(images) -> None:
    errors = request_errors(EMBEDDING, _body(images, data={"template": "/no/such/template.txt"}))
    assert list(errors) == ["data.template"] and "neither a built-in template" in errors["data.template"]


def test_size_must_be_a_multiple_of_8_or_of_64_with_buckets(images) -> None:
    assert "multiple of 8" in request_errors(EMBEDDING, _body(images, data={"size": 500}))["data.size"]
    errors = request_errors(EMBEDDING, _body(images, data={"size": 520, "buckets": True}))
    assert "multiple of 64" in errors["data.size"]
    assert request_errors(EMBEDDING, _body(images, data={"size": 520})) == {}


def test_the_methods_own_check_is_named_by_field(images) -> None:
    assert "cannot be a file name" in request_errors(EMBEDDING, _body(images, method={"name": "a/b"}))["method.name"]
    assert request_errors(EMBEDDING, _body(images, method={"name": "  "}))["method.name"].startswith("required")
