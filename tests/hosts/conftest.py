"""Fixtures: a stand-in AUTOMATIC1111 or Forge for one test, the tiny models it loads, a small image set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from webui_support import WebUI, installed


@pytest.fixture()
def a1111(tmp_path: Path) -> Iterator[WebUI]:
    with installed("a1111", tmp_path) as webui:
        yield webui


@pytest.fixture()
def forge(tmp_path: Path) -> Iterator[WebUI]:
    with installed("forge", tmp_path) as webui:
        yield webui


@pytest.fixture(params=["a1111", "forge"])
def webui(request, tmp_path: Path) -> Iterator[WebUI]:
    with installed(request.param, tmp_path) as host:
        yield host


@pytest.fixture(scope="session")
def standalone(tiny_checkpoints) -> dict[str, Any]:
    """Our tiny standalone models by family; the stand-in WebUIs load copies of their weights."""
    from lib_training.model.standalone import load_model

    return {arch: load_model(path) for arch, path in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def red_ball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("red-ball")
    for i, background in enumerate([(20, 120, 200), (30, 160, 60), (200, 200, 40)]):
        image = Image.new("RGB", (64, 64), background)
        offset = 8 + 4 * i
        ImageDraw.Draw(image).ellipse((offset, offset, offset + 36, offset + 36), fill=(240, 40, 30))
        image.save(folder / f"{i:05d}-a red ball.png")
    return folder
