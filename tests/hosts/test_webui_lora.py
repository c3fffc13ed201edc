"""LoRA training in each WebUI shape, on the WebUI's loaded model: the job writes a kohya file, the
LoRA applies there as <lora:...> would, and the WebUI's model is exactly as before afterwards —
after a finished run and after an interrupt from the WebUI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from webui_support import A1111_SHAPES, FORGE_SHAPES, finish, wait_for

from lib_training.formats.tensor_files import open_tensors
from lib_training.hosts import extension
from lib_training.methods.lora import LoraMethod

SHAPES = [("a1111", arch) for arch in A1111_SHAPES] + [("forge", arch) for arch in FORGE_SHAPES]


def _body(images: Path, steps: int) -> dict:
    return {
        "method": {"name": "zqx", "rank": 4, "alpha": 4, "locon": True, "dora": True, "train_text_encoder": True},
        "data": {"path": str(images), "size": 64, "template": "subject"},
        "loop": {"steps": steps, "save_every": 0, "preview_every": 0, "latent_sampling": "mean", "lr": "0.01"},
    }


def _outputs(model) -> torch.Tensor:
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)
    with torch.no_grad():
        cond = model.encode_prompts(["a photo of a red ball"])
        return model.predict(x_t, torch.tensor([500], device=model.device), cond).float().cpu()


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_lora_trains_on_the_webui_model_and_leaves_it_as_it_was(kind, arch, request, standalone, red_ball) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone[arch])
    service = extension.service()
    before = webui.snapshot()

    job = finish(service.start_training("lora", _body(red_ball, steps=3)))

    assert job.state == "finished", job.error
    assert webui.snapshot() == before
    result = Path(job.result["result"])
    with open_tensors(result) as source:
        keys = source.keys()
    prefixes = {key.split("_text_model")[0] for key in keys if key.startswith("lora_te")}
    assert prefixes == ({"lora_te1", "lora_te2"} if arch == "sdxl" else {"lora_te"})
    assert any(key.endswith(".dora_scale") for key in keys)
    with service.workspace.session():
        model = service.workspace.model()
        lora = LoraMethod.load(result, model)
        plain = _outputs(model)
        with lora.apply_for_generation(model, 1.0):
            applied = _outputs(model)
        assert torch.equal(_outputs(model), plain)
    assert not torch.allclose(applied, plain, atol=1e-5)
    assert webui.snapshot() == before


@pytest.mark.parametrize(("kind", "arch"), [("a1111", "sdxl"), ("forge", "sd1")])
def test_interrupt_from_the_webui_leaves_the_model_as_it_was(kind, arch, request, standalone, red_ball) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone[arch])
    before = webui.snapshot()

    job = extension.service().start_training("lora", _body(red_ball, steps=10_000))
    wait_for(
        lambda: job.progress is not None and job.progress.phase == "training" and job.progress.step >= 2, what="steps"
    )
    webui.state.interrupt()
    finish(job)

    assert job.state == "interrupted", job.error
    assert Path(job.result["result"]).is_file()
    assert webui.snapshot() == before


@pytest.mark.parametrize(("kind", "arch"), [("a1111", "sd1"), ("a1111", "sdxl"), ("forge", "sdxl")])
def test_cached_text_outputs_leave_the_webui_model_as_it_was(kind, arch, request, standalone, red_ball) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone[arch])
    before = webui.snapshot()
    body = _body(red_ball, steps=3)
    body["method"]["train_text_encoder"] = False
    body["loop"]["cache_text_outputs"] = True

    job = finish(extension.service().start_training("lora", body))

    assert job.state == "finished", job.error
    assert webui.snapshot() == before
