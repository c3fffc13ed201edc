"""Textual inversion in each WebUI shape: it learns, and the WebUI's model is exactly as before
afterwards — after a finished run, an interrupt from the WebUI, and a failure inside the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from learning import fixed_eval_loss, random_like
from webui_support import A1111_SHAPES, FORGE_SHAPES, finish, training_body, wait_for

from lib_training.formats.embedding_files import read_embedding
from lib_training.formats.fingerprint import hooks_snapshot
from lib_training.hosts import extension
from lib_training.methods.embedding import initial_vectors
from lib_training.model.diffusion import SizeConditioning

SHAPES = [("a1111", arch) for arch in A1111_SHAPES] + [("forge", arch) for arch in FORGE_SHAPES]


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_textual_inversion_learns_and_leaves_the_webui_model_as_it_was(
    kind, arch, request, standalone, red_ball
) -> None:
    """Learning: the evaluation loss falls 5% below the start and below random embeddings of equal norm."""
    webui = request.getfixturevalue(kind)
    webui.load(standalone[arch])
    service = extension.service()
    before = webui.snapshot()

    job = finish(service.start_training("embedding", training_body(red_ball, steps=50, lr="0.02")))

    assert job.state == "finished", job.error
    assert webui.snapshot() == before
    with service.workspace.session():
        model = service.workspace.model()
        expect = {e.key: e.width for e in model.text_encoders}
        start = {e.key: initial_vectors(e, "ball", 2) for e in model.text_encoders}
        trained = read_embedding(Path(job.result["result"]), expect=expect).vectors
        start_loss = fixed_eval_loss(model, red_ball, "zqx", start)
        trained_loss = fixed_eval_loss(model, red_ball, "zqx", trained)
        random_losses = [fixed_eval_loss(model, red_ball, "zqx", random_like(trained, seed)) for seed in range(3)]
    assert trained_loss < 0.95 * start_loss, (start_loss, trained_loss)
    assert trained_loss < min(random_losses), (trained_loss, random_losses)


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_interrupt_from_the_webui_stops_the_job_and_leaves_the_model_as_it_was(
    kind, arch, request, standalone, red_ball
) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone[arch])
    before = webui.snapshot()

    job = extension.service().start_training("embedding", training_body(red_ball, steps=10_000))
    wait_for(
        lambda: job.progress is not None and job.progress.phase == "training" and job.progress.step >= 2, what="steps"
    )
    webui.state.interrupt()  # the API's /sdapi/v1/interrupt, or the toprow button with one job
    finish(job)

    assert job.state == "interrupted", job.error
    assert 2 <= job.result["steps"] < 10_000
    assert Path(job.result["result"]).is_file()  # it saved before stopping
    assert webui.snapshot() == before


@pytest.mark.parametrize(("kind", "arch"), SHAPES)
def test_failure_inside_the_run_fails_the_job_and_leaves_the_model_as_it_was(
    kind, arch, request, standalone, red_ball
) -> None:
    webui = request.getfixturevalue(kind)
    sd_model = webui.load(standalone[arch])
    unet_class = type(
        webui.host_modules()["kmodel"].diffusion_model if kind == "forge" else sd_model.model.diffusion_model
    )
    before = webui.snapshot()
    unet_class.fail_at_call = unet_class.calls + 3  # the third UNet call of the job raises

    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=50)))

    assert job.state == "failed"
    assert "injected failure in the UNet" in job.error
    unet_class.fail_at_call = None
    assert webui.snapshot() == before


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_gradient_checkpointing_gives_the_same_gradients_and_leaves_nothing_behind(kind, request, standalone) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone["sdxl"])
    before = webui.snapshot()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gradients, overrides = [], []
    with extension.make_host().session() as model:
        for enabled in (False, True, False):
            model.set_gradient_checkpointing(enabled)
            overrides.append(sum(counts[4] for counts in hooks_snapshot({"unet": model.modules["unet"]}).values()))
            generator = torch.Generator().manual_seed(1)
            vectors = {
                e.key: torch.nn.Parameter(0.02 * torch.randn(2, e.width, generator=generator))
                for e in model.text_encoders
            }
            cond = model.encode_prompts(["a photo of zqx"], {"zqx": vectors}, [SizeConditioning((64, 64))])
            model.predict(x, torch.tensor([500]), cond).square().mean().backward()
            gradients.append(torch.cat([v.grad.flatten() for v in vectors.values()]))
    torch.testing.assert_close(gradients[1], gradients[0])
    assert overrides[0] == overrides[2] and overrides[1] > overrides[0]  # instance forwards only while on
    assert webui.snapshot() == before


def test_the_verify_setting_checks_the_model_after_a_job_without_false_alarms(webui, standalone, red_ball) -> None:
    from lib_training.hosts import settings

    webui.load(standalone["sd1"])
    webui.shared.opts.data[settings.VERIFY_MODEL] = True
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=3)))
    assert job.state == "finished", job.error
