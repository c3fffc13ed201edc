"""The tiny world's pretrained checkpoint is an ordinary SD1 checkpoint to the WebUIs too."""

from __future__ import annotations

import pytest
import torch

from lib_training.model.standalone import load_model
from lib_training.world.model import world_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return load_model(world_checkpoint(tmp_path_factory.mktemp("world-cache")))


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_the_world_model_loads_in_the_webui_and_draws_like_our_own_model_code(kind, request, world) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(world)
    host = webui.module("lib_training.hosts.extension").make_host()
    prompts = ["a red circle on a dark background", "an orange star on a light background"]
    with host.session() as model, torch.no_grad():
        assert model.family == world.family
        got = model.encode_prompts(prompts)
        want = world.encode_prompts(prompts)
        torch.testing.assert_close(got.context, want.context, atol=1e-5, rtol=1e-4)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([10, 900])
        torch.testing.assert_close(model.predict(x, t, got), world.predict(x, t, want), atol=1e-5, rtol=1e-4)
        images = torch.rand(1, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(model.encode_images(images), world.encode_images(images), atol=1e-5, rtol=1e-4)
