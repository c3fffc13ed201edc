"""Long-running jobs (training, merging) on a background thread, one at a time.

The UI and the HTTP API share one `JobManager`. Starting a job while another runs is refused
with `JobBusyError` (the API answers 409), never queued behind it or run beside it. Inside a WebUI
the manager is given the host's `run_exclusive`, which holds the host's queue lock for the whole
job so that generation cannot run on a half-trained model.

Every job's start, end and failure is logged (logger `lib_training.app.jobs`): a failure the user caused
as its message, any other with its traceback, so the server's terminal shows what went wrong.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_training.devices import give_back_freed_memory
from lib_training.errors import UserError
from lib_training.training.progress import Progress

log = logging.getLogger(__name__)


def busy_text(title: str) -> str:
    """The one sentence for "another job holds the job slot": the API's 409, the UI's forms, the hosts."""
    return f"Another job is already running ({title}); start this one when it has finished, or interrupt it."


class JobBusyError(UserError):
    """Another job is running."""


class JobNotFoundError(UserError):
    pass


@dataclass
class Job:
    id: str
    kind: str  # "train/embedding", "merge", ...
    title: str  # for people: "Textual inversion: my-cat"
    settings: dict[str, Any]
    state: str = "running"  # running, finished, interrupted, failed
    progress: Progress | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def to_dict(self) -> dict[str, Any]:
        progress = None
        if self.progress is not None:
            p = self.progress
            progress = {
                "phase": p.phase,
                "step": p.step,
                "total": p.total,
                "fraction": p.fraction,
                "loss": p.loss,
                "lr": p.lr,
                "steps_per_second": p.steps_per_second,
                "eta_seconds": p.eta_seconds,
                "preview": str(p.preview) if p.preview else None,
                "message": p.message,
                "text": p.describe(),
            }
        return {
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "state": self.state,
            "stop_requested": self.stop_event.is_set(),
            "progress": progress,
            "result": self.result,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "settings": self.settings,
        }


@dataclass
class JobContext:
    """What a job's work function gets: a way to report progress and to notice a stop request."""

    job: Job

    def report(self, progress: Progress) -> None:
        self.job.progress = progress

    def should_stop(self) -> bool:
        return self.job.stop_event.is_set()


Work = Callable[[JobContext], dict[str, Any]]
RunExclusive = Callable[["Job", Callable[[], None]], None]  # (job, body): run body, holding what the host needs


def _run_directly(job: Job, fn: Callable[[], None]) -> None:
    fn()


class JobManager:
    def __init__(self, run_exclusive: RunExclusive = _run_directly, keep: int = 20) -> None:
        self._run_exclusive = run_exclusive
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._current: Job | None = None
        self._keep = keep

    def ensure_idle(self) -> None:
        """Raise JobBusyError if a job is running: the one place that question is answered."""
        current = self._current
        if current is not None and current.running:
            raise JobBusyError(busy_text(current.title))

    def start(self, kind: str, title: str, work: Work, settings: dict[str, Any] | None = None) -> Job:
        """Run `work` on a background thread; raise JobBusyError if a job is running."""
        with self._lock:
            self.ensure_idle()
            job = Job(uuid.uuid4().hex[:12], kind, title, settings or {})
            self._current = job
            self._jobs[job.id] = job
            for old in list(self._jobs)[: max(0, len(self._jobs) - self._keep)]:
                del self._jobs[old]
        log.info("job %s started: %s", job.id, job.title)
        thread = threading.Thread(target=self._run, args=(job, work), name=f"job-{job.id}", daemon=True)
        thread.start()
        return job

    def _run(self, job: Job, work: Work) -> None:
        def body() -> None:
            if job.stop_event.is_set():  # cancelled while waiting for the host's queue: do nothing
                job.result = {"cancelled": True}
                job.state = "interrupted"
                return
            context = JobContext(job)
            try:
                job.result = work(context) or {}
                job.state = "interrupted" if job.stop_event.is_set() else "finished"
            except UserError as error:
                job.error = str(error)
                job.state = "failed"
                log.warning("job %s failed: %s", job.id, error)
            except Exception as error:  # a bug: keep the traceback for the report
                job.error = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
                job.state = "failed"
                log.error("job %s (%s) failed with an unexpected error", job.id, job.title, exc_info=True)

        try:
            self._run_exclusive(job, body)
        except Exception as error:  # the host refused to run it (e.g. its own job is running)
            job.error = str(error)
            job.state = "failed"
            log.warning("job %s could not run: %s", job.id, error)
        finally:
            give_back_freed_memory()
            job.finished = time.time()
            if job.state != "failed":
                log.info("job %s %s after %.1f s: %s", job.id, job.state, job.finished - job.started, job.title)
            job.done_event.set()

    def current(self) -> Job | None:
        return self._current

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFoundError(f"no job {job_id!r}") from None

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        """Ask a running job to stop (it saves and stops at its next step)."""
        job = self.get(job_id)
        job.stop_event.set()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self.get(job_id)
        job.done_event.wait(timeout)
        return job
