"""Shared fixtures: tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never write into the real user cache (demo assets, file hashes)."""
    import os

    previous = os.environ.get("SDWT_CACHE")
    os.environ["SDWT_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if previous is None:
        os.environ.pop("SDWT_CACHE", None)
    else:
        os.environ["SDWT_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of tiny random checkpoints: "sd1", "sd2", "sdxl" (seed 0), written on first use."""
    from lib_training.model.tiny import make_tiny

    folder = tmp_path_factory.mktemp("tiny")
    paths: dict[str, Path] = {}
    for arch in ("sd1", "sd2", "sdxl"):
        path = folder / f"tiny-{arch}.safetensors"
        make_tiny(arch, seed=0).save(path)
        paths[arch] = path
    return paths


@pytest.fixture(scope="session")
def tiny_sd1(tiny_checkpoints: dict[str, Path]):
    from lib_training.model.standalone import load_model

    return load_model(tiny_checkpoints["sd1"])


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_checkpoints: dict[str, Path]):
    from lib_training.model.standalone import load_model

    return load_model(tiny_checkpoints["sdxl"])
