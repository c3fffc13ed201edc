"""Jobs inside the WebUI: one at a time, holding the WebUI's queue lock (generation waits, and a job
waits for a generation), reporting through the WebUI's progress state, stopped by its Interrupt."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from webui_support import finish, training_body, wait_for

from lib_training.app.api import PREFIX, build_router
from lib_training.app.jobs import JobBusyError
from lib_training.hosts import extension
from lib_training.hosts.exclusive import task_id


def started(service, images, **loop):
    job = service.start_training("embedding", training_body(images, steps=10_000, **loop))
    wait_for(lambda: job.progress is not None and job.progress.phase == "training", what="training to start")
    return job


def test_a_second_job_is_refused_while_one_runs(a1111, standalone, red_ball) -> None:
    a1111.load(standalone["sd1"])
    service = extension.service()
    app = FastAPI()
    app.include_router(build_router(service))
    job = started(service, red_ball)
    try:
        with pytest.raises(JobBusyError):
            service.start_training("embedding", training_body(red_ball, name="other"))
        with TestClient(app) as client:
            response = client.post(f"{PREFIX}/train/embedding", json=training_body(red_ball, name="other"))
        assert response.status_code == 409
        assert job.running
    finally:
        service.jobs.cancel(job.id)
        finish(job)
    assert job.state == "interrupted"


def test_generation_waits_for_the_lock_until_the_job_has_restored_the_model(webui, standalone, red_ball) -> None:
    webui.load(standalone["sd1"])
    before = webui.snapshot()
    service = extension.service()
    call_queue, progress = webui.module("modules.call_queue"), webui.module("modules.progress")
    seen = {}

    def generate(id_task):  # what txt2img does, as the WebUI wraps it
        seen["snapshot"] = webui.snapshot()
        seen["job_running"] = job.running
        return ["image"], "info"

    job = started(service, red_ball)
    generation = threading.Thread(target=call_queue.wrap_gradio_gpu_call(generate), args=("task(txt2img-1)",))
    generation.start()
    time.sleep(0.3)
    assert "snapshot" not in seen  # still waiting for the lock
    assert progress.progressapi("task(txt2img-1)")["queued"]
    service.jobs.cancel(job.id)
    generation.join(timeout=60)

    assert seen["job_running"] is False
    assert {k: v for k, v in seen["snapshot"].items() if k not in ("lock_free", "state")} == {
        k: v for k, v in before.items() if k not in ("lock_free", "state")
    }
    assert finish(job).state == "interrupted"


def test_a_job_waits_for_a_running_generation_and_shows_as_queued(a1111, standalone, red_ball) -> None:
    a1111.load(standalone["sd1"])
    call_queue, progress = a1111.module("modules.call_queue"), a1111.module("modules.progress")
    call_queue.queue_lock.acquire()  # a generation holds the WebUI
    try:
        job = extension.service().start_training("embedding", training_body(red_ball, steps=2))
        wait_for(lambda: job.progress is not None, what="the job to report")
        time.sleep(0.2)
        assert job.progress.phase == "waiting for the WebUI"
        assert progress.progressapi(task_id(job))["queued"]
        assert job.running
    finally:
        call_queue.queue_lock.release()
    assert finish(job).state == "finished", job.error
    assert task_id(job) in progress.finished_tasks


def test_progress_text_and_live_preview_reach_the_webui(a1111, standalone, red_ball) -> None:
    a1111.load(standalone["sd1"])
    progress, state = a1111.module("modules.progress"), a1111.state
    body = training_body(red_ball, steps=6, preview_every=3, preview_steps=2, preview_size=64)
    job = extension.service().start_training("embedding", body)
    answers = []
    while not job.done_event.is_set():
        answers.append(progress.progressapi(task_id(job)))
        time.sleep(0.05)

    assert job.state == "finished", job.error
    active = [a for a in answers if a["active"]]
    assert active, "the WebUI never saw the job as its current task"
    assert any(a["progress"] > 0 and "Textual inversion: zqx" in (a["textinfo"] or "") for a in active)
    assert state.current_image is not None and state.id_live_preview >= 1
    assert state.current_image.size == (64, 64)
    assert (state.job, state.job_count, state.interrupted, state.stopping_generation) == ("", 0, False, False)
    assert progress.current_task is None


def test_the_toprow_interrupt_button_stops_the_job(a1111, standalone, red_ball) -> None:
    """With a job of many steps and "interrupt after current" (the default) the button only asks to stop
    generating; a training job stops on that too."""
    a1111.load(standalone["sd1"])
    job = started(extension.service(), red_ball)
    a1111.state.stop_generating()
    assert finish(job).state == "interrupted"
    assert a1111.state.stopping_generation is False  # reset for the next task, as the WebUI does
