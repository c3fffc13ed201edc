"""What a merge tool's run panel shows: the progress bar of its job, and the file it wrote. The
job-following part (`JobView`) also serves the Training tab's aesthetic-embedding sub-tab.

As in the Training tab (`run_view`), the job runs on the `JobManager`'s thread and the page asks
for news about once a second; `JobView.poll` answers from the job's state alone and sends only
what changed since the page's last poll (`seen`, kept per browser session).
"""

from __future__ import annotations

import html
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lib_training.app.jobs import Job, JobManager
from lib_training.app.merge_service import MergeService, MergeTool, format_size
from lib_training.app.ui.snippets import ENDED_LABELS, another_job_text, failure_html, progress_html
from lib_training.training.progress import format_duration


@dataclass
class MergeSnapshot:
    state: str  # idle, running, busy, finished, interrupted, failed
    progress_html: str
    result_html: str
    running: bool  # this tool's job runs: Interrupt is enabled
    busy: bool  # some job runs: Start is disabled


def counts_text(result: dict[str, Any]) -> str:
    """'980 tensors merged, 7 copied', '12 LoRA modules baked into 10 weights', '40 modules'."""
    if "merged" in result:
        return f"{result['merged']} tensors merged, {result.get('copied', 0)} copied"
    if "weights" in result:
        return f"{result.get('modules', 0)} LoRA modules baked into {result['weights']} weights"
    if "modules" in result:
        return f"{result['modules']} modules"
    return ""


def result_box(job: Job) -> str:
    """The file a finished job wrote: path, sha256 of its tensor data, size, time, counts; and its warnings."""
    result = job.result
    path = html.escape(str(result["result"]))
    facts = [format_size(result.get("size") or 0), f"written in {result.get('seconds', 0):.1f} s"]
    counts = counts_text(result)
    if counts:
        facts.append(counts)
    text = (
        f'<div class="sdwt-result" data-sdwt-result="{path}"><b>Result</b>: <code>{path}</code><br>'
        f'sha256 of the tensor data: <code data-sdwt-sha256="{html.escape(result.get("sha256", ""))}">'
        f"{html.escape(result.get('sha256', ''))}</code><br>{html.escape(', '.join(facts))}</div>"
    )
    warnings = result.get("warnings") or []
    if warnings:
        items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
        text += f'<div class="sdwt-info sdwt-warnings"><b>⚠ Warnings</b><ul>{items}</ul></div>'
    return text


class JobView(ABC):
    """The progress bar and result of the newest job of one kind (a merge tool, the aesthetic
    embedding maker); subclasses say how its result looks (`result_html`)."""

    unit = "steps"  # what the progress counts when the job's progress does not say

    def __init__(self, manager: JobManager, kind: str, poll_id: str, idle_text: str) -> None:
        self.manager = manager
        self.kind = kind
        self.poll_id = poll_id  # elem_id of the hidden button the page clicks to poll
        self.idle_text = idle_text

    def jobs(self) -> tuple[Job | None, Job | None]:
        """(this kind's newest job, another running job)."""
        mine = [job for job in self.manager.jobs() if job.kind == self.kind]
        current = self.manager.current()
        other = current if current is not None and current.running and current not in mine else None
        return (max(mine, key=lambda job: job.started) if mine else None), other

    def snapshot(self) -> MergeSnapshot:
        job, other = self.jobs()
        state = job.state if job is not None else "idle"
        if other is not None and (job is None or not job.running):
            state = "busy"
        return MergeSnapshot(
            state=state,
            progress_html=self.progress_html(job, other, state),
            result_html=self.result_html(job),
            running=job is not None and job.running,
            busy=(job is not None and job.running) or other is not None,
        )

    def progress_html(self, job: Job | None, other: Job | None, state: str) -> str:
        fraction, parts = 0.0, []
        if state == "busy" and other is not None:
            parts = [another_job_text(other.title)]
        elif job is None:
            parts = [self.idle_text]
        elif job.progress is None:
            parts = ["Starting…" if job.running else ENDED_LABELS.get(job.state, job.state)]
        else:
            p = job.progress
            fraction = 1.0 if job.state == "finished" else p.fraction
            parts = [
                ENDED_LABELS.get(job.state, p.phase.capitalize()),
                f"{p.step}/{p.total} {getattr(p, 'unit', self.unit)}",
            ]
            if job.running and p.message:
                parts.append(p.message)
            if job.running and p.eta_seconds is not None:
                parts.append(f"ETA {format_duration(p.eta_seconds)}")
            if not job.running and job.finished:
                parts.append(f"took {format_duration(job.finished - job.started)}")
        return progress_html(state, self.poll_id, fraction, parts)

    @abstractmethod
    def result_html(self, job: Job | None) -> str:
        """The result line of `job` (a view of each tool says what its result is)."""

    def poll(self, seen: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any], bool]:
        """Updates for (progress, result, start, interrupt), the new `seen`, and whether a job of this
        kind has just ended (the model lists may have a new file)."""
        seen = dict(seen or {})
        now = self.snapshot()
        updates: list[Any] = [
            gr.update(value=now.progress_html) if seen.get("progress") != now.progress_html else gr.update(),
            gr.update(value=now.result_html) if seen.get("result") != now.result_html else gr.update(),
        ]
        buttons = [not now.busy, now.running]
        if seen.get("buttons") != buttons:
            updates += [gr.update(interactive=buttons[0]), gr.update(interactive=buttons[1])]
        else:
            updates += [gr.update(), gr.update()]
        ended = bool(seen.get("running")) and not now.running
        seen.update(progress=now.progress_html, result=now.result_html, buttons=buttons, running=now.running)
        return updates, seen, ended


class MergeView(JobView):
    """A merge tool's run panel: its result is the file written, with its sha256, and earlier results."""

    def __init__(self, merges: MergeService, spec: MergeTool, poll_id: str, idle_text: str) -> None:
        super().__init__(merges.jobs, spec.kind, poll_id, idle_text)
        self.merges = merges
        self.spec = spec

    def result_html(self, job: Job | None) -> str:
        parts = []
        if job is not None and job.state == "failed":
            parts.append(failure_html(job.title, job.error))
        elif job is not None and job.result.get("cancelled"):
            parts.append('<div class="sdwt-info">Interrupted: no file was written.</div>')
        elif job is not None and not job.running and job.result.get("result"):
            parts.append(result_box(job))
        earlier = [other for other in self.merges.results(self.spec.kind) if other is not job]
        if earlier:
            items = "".join(
                f"<li><code>{html.escape(str(e.result['result']))}</code><br>sha256 "
                f"<code>{html.escape(str(e.result.get('sha256', '')))}</code></li>"
                for e in earlier
            )
            summary = f"<summary>Earlier results ({len(earlier)})</summary>"
            parts.append(f'<details class="sdwt-outputs">{summary}<ul>{items}</ul></details>')
        return "".join(parts)
