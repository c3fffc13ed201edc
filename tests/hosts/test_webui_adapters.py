"""The adapters see the WebUIs' loaded models as our model interface, with the hosts' own semantics."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from webui_support import A1111_SHAPES, FORGE_SHAPES

SHAPES = [("a1111", arch) for arch in A1111_SHAPES] + [("forge", arch) for arch in FORGE_SHAPES]


def conditioned_like_the_host(kind, ours):
    """Our model with the host's layer choice: Forge's SD2 conditions on the last layer of OpenCLIP-H
    (then its final norm), A1111 and the original SD2 on the penultimate one."""
    if kind != "forge" or ours.family.name != "sd2":
        return ours
    model = copy.copy(ours)
    encoder = copy.deepcopy(ours.text_encoders[0])
    encoder.config = dataclasses.replace(encoder.config, output_layer="last")
    model.text_encoders = [encoder]
    return model


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_adapter_conditions_and_predicts_like_the_standalone_model(kind, arch, request, standalone) -> None:
    """Same weights, same prompts: the host's towers (their layer choice, final norm, pooling) and UNet
    give what our own model code gives, so an embedding trained in the WebUI works everywhere."""
    webui = request.getfixturevalue(kind)
    ours = standalone[arch]
    webui.load(ours)
    prompts = ["a photo of a red ball", "zqx, a (ball) on grass"]
    vectors = {e.key: torch.randn(2, e.width, generator=torch.Generator().manual_seed(0)) for e in ours.text_encoders}
    host = webui.module("lib_training.hosts.extension").make_host()
    with host.session() as model, torch.no_grad():
        assert model.family == ours.family
        got = model.encode_prompts(prompts, {"zqx": vectors})
        want = conditioned_like_the_host(kind, ours).encode_prompts(prompts, {"zqx": vectors})
        torch.testing.assert_close(got.context, want.context, atol=1e-5, rtol=1e-4)
        if want.y is not None:
            torch.testing.assert_close(got.y, want.y, atol=1e-5, rtol=1e-4)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([10, 900])
        torch.testing.assert_close(model.predict(x, t, got), ours.predict(x, t, want), atol=1e-5, rtol=1e-4)
        images = torch.rand(1, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(model.encode_images(images), ours.encode_images(images), atol=1e-5, rtol=1e-4)
