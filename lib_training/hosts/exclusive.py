"""Jobs inside a WebUI: the host's queue lock for the whole job, and its progress state kept current.

`run_exclusive` is given to our `JobManager`. It waits for the WebUI's `queue_lock` (a running
generation finishes first; generations asked for meanwhile wait behind the job), then does what
the host's own `wrap_gradio_gpu_call` does around a task: `shared.state.begin`, the task marked
current for `/internal/progress`, and afterwards `state.end()` and the stop flags reset. While the
job runs, `StateBridge` copies its progress into `shared.state` (steps, text, the newest preview as
the live preview) and turns the host's Interrupt (`state.interrupted`, or `stopping_generation`
from the toprow button) into a stop request.

Inside the lock the job must not call host functions that take the lock themselves (generation,
setting checkpoint options): previews use our own sampler.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib_training.app.jobs import Job
from lib_training.training.progress import Progress

POLL_SECONDS = 0.25


def task_id(job: Job) -> str:
    """The id the host's progress API knows the job by (its `task(...)` form)."""
    return f"task(sd-webui-training-{job.id})"


class StateBridge:
    """Every `interval` seconds (and once more at the end): the job's progress into the host's
    `shared.state`, and the host's interrupt flags into the job's stop request."""

    def __init__(self, job: Job, state: Any, interval: float = POLL_SECONDS) -> None:
        self.job = job
        self.state = state
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"state-bridge-{job.id}", daemon=True)
        self._shown_preview: Path | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sync()

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval):
            self.sync()

    def sync(self) -> None:
        state, job = self.state, self.job
        if state.interrupted or state.stopping_generation:
            job.stop_event.set()
        progress = job.progress
        if progress is None:
            return
        state.job_count = progress.total
        state.job_no = progress.step
        state.sampling_step = 0
        state.sampling_steps = 0
        state.textinfo = f"{job.title}: {progress.describe()}"
        self._show_preview(progress)

    def _show_preview(self, progress: Progress) -> None:
        path = progress.preview
        if path is None or path == self._shown_preview:
            return
        try:
            from PIL import Image

            with Image.open(path) as image:
                picture = image.convert("RGB")
        except OSError:
            return  # not readable yet; tried again at the next sync
        self.state.assign_current_image(picture)
        self._shown_preview = path


def run_exclusive(job: Job, body: Callable[[], None]) -> None:
    """Run `body` (the job) holding the WebUI's queue lock, reporting through its progress state."""
    from modules import progress, shared
    from modules.call_queue import queue_lock

    id_task = task_id(job)
    progress.add_task_to_queue(id_task)  # the page shows "In queue" for it while it waits
    if not queue_lock.acquire(blocking=False):
        job.progress = Progress("waiting for the WebUI", 0, 0, message="a generation or another task runs")
        queue_lock.acquire()
    try:
        state = shared.state
        state.begin(job=id_task)
        progress.start_task(id_task)
        bridge = StateBridge(job, state)
        bridge.start()
        try:
            with torch.inference_mode(False):
                body()
        finally:
            bridge.stop()
            progress.finish_task(id_task)
            state.end()
            state.skipped = state.interrupted = state.stopping_generation = False
            state.job_count = 0
            state.job = ""
    finally:
        progress.pending_tasks.pop(id_task, None)
        queue_lock.release()
