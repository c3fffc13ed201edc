"""The job manager: one job at a time, cancel before and during a job."""

from __future__ import annotations

import logging
import threading

import pytest

from lib_training.app.jobs import JobBusyError, JobManager


def test_a_second_job_is_refused_while_one_runs() -> None:
    release = threading.Event()
    jobs = JobManager()
    first = jobs.start("test", "first", lambda context: release.wait(10) and {})
    with pytest.raises(JobBusyError, match="already running \\(first\\)"):
        jobs.start("test", "second", lambda context: {})
    release.set()
    assert jobs.wait(first.id, 10).state == "finished"


def test_a_job_cancelled_while_waiting_for_the_host_never_runs() -> None:
    host_busy = threading.Event()
    entered = threading.Event()

    def run_exclusive(job, body) -> None:  # a host whose queue is held by a generation
        entered.set()
        host_busy.wait(10)
        body()

    ran = []
    jobs = JobManager(run_exclusive)
    job = jobs.start("test", "queued", lambda context: ran.append(True) or {"done": True})
    entered.wait(10)
    jobs.cancel(job.id)
    host_busy.set()
    finished = jobs.wait(job.id, 10)
    assert finished.state == "interrupted" and finished.result == {"cancelled": True}
    assert ran == []


def test_a_user_error_fails_the_job_with_its_message() -> None:
    from lib_training.errors import UserError

    def work(context):
        raise UserError("the dataset folder is empty")

    jobs = JobManager()
    job = jobs.wait(jobs.start("test", "failing", work).id, 10)
    assert job.state == "failed" and job.error == "the dataset folder is empty"


def test_progress_without_a_count_reads_as_its_phase_and_message() -> None:
    from lib_training.training.progress import Progress

    waiting = Progress("waiting for the WebUI", 0, 0, message="a generation or another task runs")
    assert waiting.describe() == "waiting for the WebUI: a generation or another task runs"
    assert Progress("training", 3, 10, loss=0.5).describe() == "training 3/10, loss 0.5000"


def test_a_finished_job_gives_the_memory_it_freed_back(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("lib_training.app.jobs.give_back_freed_memory", lambda: calls.append("given back"))
    jobs = JobManager()
    job = jobs.wait(jobs.start("test", "finishing", lambda context: {"ok": True}).id, 10)
    assert job.state == "finished" and calls == ["given back"]


def test_start_end_and_failure_are_logged_with_the_traceback_of_a_bug(caplog) -> None:
    jobs = JobManager()
    caplog.set_level(logging.INFO, logger="lib_training.app.jobs")
    done = jobs.wait(jobs.start("train/x", "Fine job", lambda context: {}).id, 5)
    assert done.state == "finished"

    def broken(context):
        raise ZeroDivisionError("a bug")

    failed = jobs.wait(jobs.start("train/x", "Broken job", broken).id, 5)
    assert failed.state == "failed"
    messages = [record.getMessage() for record in caplog.records]
    assert any("started: Fine job" in m for m in messages) and any("finished after" in m for m in messages)
    assert any("started: Broken job" in m for m in messages)
    error = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert "Broken job" in error.getMessage() and error.exc_info[0] is ZeroDivisionError


def test_a_user_error_is_logged_as_its_message(caplog) -> None:
    from lib_training.errors import UserError

    jobs = JobManager()

    def refused(context):
        raise UserError("the dataset folder is empty")

    jobs.wait(jobs.start("train/x", "Job", refused).id, 5)
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "the dataset folder is empty" in warning.getMessage() and warning.exc_info is None


def test_the_busy_message_is_the_same_in_the_api_and_the_forms() -> None:
    from lib_training.app.ui.snippets import another_job_text

    jobs = JobManager()
    gate = threading.Event()
    first = jobs.start("test", "first", lambda context: gate.wait(5) and {})
    with pytest.raises(JobBusyError) as caught:
        jobs.start("test", "second", lambda context: {})
    assert str(caught.value) == another_job_text("first")
    gate.set()
    jobs.wait(first.id, 5)


def test_a_finished_job_shows_no_eta() -> None:
    from lib_training.training.progress import Progress

    assert "ETA" not in Progress("merging", 10, 10, eta_seconds=0.0).describe()
    assert "ETA 0:05" in Progress("merging", 5, 10, eta_seconds=5.0).describe()
