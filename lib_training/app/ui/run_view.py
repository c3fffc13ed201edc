"""What a method's run panel shows: progress bar, newest preview, loss plot and result of its job.

The job runs on the `JobManager`'s thread; the page asks for news about once a second (see
`javascript/sdwt-training.js`). `RunView.poll` answers from the job's state alone, cheaply, and
sends only what changed since the page's last poll (`seen`, kept per browser session), so an idle
page costs almost nothing and images are sent once each.
"""

from __future__ import annotations

import csv
import html
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from lib_training.app.jobs import Job
from lib_training.app.service import TrainingService
from lib_training.app.ui.snippets import ENDED_LABELS, another_job_text, failure_html, progress_html
from lib_training.training.method import MethodSpec
from lib_training.training.plot import plot_loss
from lib_training.training.progress import format_duration

_STEP_IN_NAME = re.compile(r"-(\d+)\.png$")
PHASES = ("caching latents", "training")  # a run's phases, as the progress bar lists them
TEXT_CACHING_PHASES = ("caching latents", "caching text", "training")  # with cache_text_outputs
BEFORE_TRAINING = ("preparing", "caching latents", "caching text")  # progress phases of the first one
_COUNTED = {"caching latents": "images", "caching text": "prompts"}  # what a caching phase counts
OUTPUTS_TTL = 10.0  # seconds between scans of the results folders while nothing changes


def _phases(job: Job) -> tuple[str, ...]:
    """The phases of this job's run: text caching is one when the request asks for it."""
    loop = job.settings.get("loop", {}) if isinstance(job.settings, dict) else {}
    cached = isinstance(loop, dict) and (loop.get("cache_text_outputs") or loop.get("cache_text_outputs_to_disk"))
    return TEXT_CACHING_PHASES if cached else PHASES


def _load_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError:
        return None


class LossHistory:
    """(step, loss) points of the newest job: its `loss.csv` (written at previews and saves) and the
    losses seen in its progress reports since, so the plot moves between writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: str | None = None
        self._seen: dict[int, float] = {}

    def observe(self, job: Job) -> None:
        progress = job.progress
        with self._lock:
            if job.id != self._job:
                self._job, self._seen = job.id, {}
            if progress is not None and progress.phase == "training" and progress.loss is not None:
                self._seen[progress.step] = progress.loss

    def points(self, job: Job, folder: Path) -> list[tuple[int, float]]:
        points = dict(_read_losses(folder / "loss.csv", since=job.started))
        with self._lock:
            if job.id == self._job:
                points.update({step: loss for step, loss in self._seen.items() if step not in points})
        return sorted(points.items())


def _read_losses(path: Path, since: float) -> list[tuple[int, float]]:
    """Rows of a run's loss.csv written after `since` (an older file belongs to an earlier run)."""
    try:
        if path.stat().st_mtime < since:
            return []
        with path.open(newline="", encoding="utf-8") as file:
            return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(file)]
    except (OSError, ValueError, KeyError):
        return []


@dataclass
class RunSnapshot:
    """The panel's content for one moment; each part has a key that changes when the part does."""

    state: str  # idle, running, busy, finished, interrupted, failed
    progress_html: str
    preview: Path | None
    loss_key: str
    result_html: str
    running: bool  # this method's job runs: Interrupt is enabled
    busy: bool  # some job runs: Start is disabled


class RunView:
    def __init__(self, service: TrainingService, spec: MethodSpec, poll_id: str) -> None:
        self.service = service
        self.spec = spec
        self.kind = spec.kind
        self.poll_id = poll_id  # elem_id of the hidden button the page clicks to poll
        self.history = LossHistory()
        self._outputs: tuple[str, float, str] | None = None  # (key, time, html)

    # --- which job ------------------------------------------------------------------------------
    def jobs(self) -> tuple[Job | None, Job | None]:
        """(this method's newest job, another method's running job)."""
        mine = [job for job in self.service.jobs.jobs() if job.kind == f"train/{self.kind}"]
        current = self.service.jobs.current()
        other = current if current is not None and current.running and current not in mine else None
        return (max(mine, key=lambda job: job.started) if mine else None), other

    def run_folder(self, job: Job) -> Path:
        folder = job.result.get("folder")
        if folder:
            return Path(folder)
        return self.service.workspace.run_folder(self.spec, str(job.settings.get("method", {}).get("name", "")))

    # --- what to show ---------------------------------------------------------------------------
    def snapshot(self) -> RunSnapshot:
        job, other = self.jobs()
        if job is not None:
            self.history.observe(job)
        state = job.state if job is not None else "idle"
        if other is not None and (job is None or not job.running):
            state = "busy"
        preview = job.progress.preview if job is not None and job.progress is not None else None
        return RunSnapshot(
            state=state,
            progress_html=self.progress_html(job, other, state),
            preview=preview,
            loss_key=self._loss_key(job),
            result_html=self.result_html(job),
            running=job is not None and job.running,
            busy=(job is not None and job.running) or other is not None,
        )

    def progress_html(self, job: Job | None, other: Job | None, state: str) -> str:
        fraction, parts = 0.0, []
        if state == "busy" and other is not None:
            parts = [another_job_text(other.title)]
        elif job is None:
            parts = ["No run yet: preview the dataset, then press Start."]
        else:
            p = job.progress
            if p is None:
                parts = ["Starting…" if job.running else ENDED_LABELS.get(job.state, job.state)]
            elif job.running and p.phase in BEFORE_TRAINING:
                unit = _COUNTED.get(p.phase)
                counted = f"{p.step}/{p.total} {unit}" if unit and p.total else ""
                parts = [p.phase.capitalize(), *([counted] if counted else []), *([p.message] if p.message else [])]
                phases = _phases(job)
                now = phases.index(p.phase) if p.phase in phases else 0  # "preparing": the first phase's
                return progress_html(state, self.poll_id, p.fraction, parts, phases, now)
            else:
                fraction = 1.0 if job.state == "finished" else p.fraction
                parts = [ENDED_LABELS.get(job.state, p.phase.capitalize()), f"step {p.step}/{p.total}"]
                if job.running and p.steps_per_second:
                    parts.append(f"{p.steps_per_second:.2f} it/s")
                if job.running and p.eta_seconds is not None:
                    parts.append(f"ETA {format_duration(p.eta_seconds)}")
                loss = p.loss if p.loss is not None else job.result.get("loss")
                if loss is not None:
                    parts.append(f"loss {loss:.4f}")
                if not job.running and job.finished:
                    parts.append(f"took {format_duration(job.finished - job.started)}")
                if p.message and job.running:
                    parts.append(p.message)
                phases = _phases(job)
                return progress_html(state, self.poll_id, fraction, parts, phases, len(phases) - 1)
        return progress_html(state, self.poll_id, fraction, parts)

    def result_html(self, job: Job | None) -> str:
        parts = []
        if job is not None and job.state == "failed":
            parts.append(failure_html("Training", job.error))
        elif job is not None and not job.running and job.result.get("result"):
            path = html.escape(job.result["result"])
            state = "stopped early" if job.result.get("interrupted") else "finished"
            parts.append(
                f'<div class="sdwt-result" data-sdwt-result="{path}"><b>Result</b> ({state} after '
                f"{job.result.get('steps')} steps): <code>{path}</code><br>Run folder (previews, loss.csv, "
                f"config.json): <code>{html.escape(str(job.result.get('folder', '')))}</code></div>"
            )
        parts.append(self._outputs_html(f"{job.id}:{job.state}" if job is not None else ""))
        return "".join(parts)

    def _outputs_html(self, key: str) -> str:
        """The list of this method's results; the folders are scanned again when the job changes
        state, or after `OUTPUTS_TTL` seconds (results may come from elsewhere)."""
        now = time.monotonic()
        if self._outputs is None or self._outputs[0] != key or now - self._outputs[1] > OUTPUTS_TTL:
            outputs = [o for o in self.service.outputs() if o.kind == self.kind]
            items = "".join(
                f"<li><b>{html.escape(o.name)}</b> <code>{html.escape(str(o.path))}</code></li>" for o in outputs
            )
            summary = f"<summary>All results ({len(outputs)})</summary>"
            text = f'<details class="sdwt-outputs">{summary}<ul>{items}</ul></details>' if outputs else ""
            self._outputs = (key, now, text)
        return self._outputs[2]

    def _loss_key(self, job: Job | None) -> str:
        if job is None:
            return ""
        folder = self.run_folder(job)
        plot = folder / "loss.png"
        if not job.running and plot.exists() and plot.stat().st_mtime >= job.started:
            return f"{job.id}:png:{plot.stat().st_mtime}"
        points = self.history.points(job, folder)
        return f"{job.id}:{len(points)}:{points[-1][0] if points else 0}"

    def loss_image(self, job: Job | None) -> Image.Image | None:
        if job is None:
            return None
        folder = self.run_folder(job)
        plot = folder / "loss.png"
        if not job.running and plot.exists() and plot.stat().st_mtime >= job.started:
            return _load_image(plot)
        points = self.history.points(job, folder)
        if not points:
            return None
        name = job.settings.get("method", {}).get("name", "")
        return plot_loss([s for s, _ in points], [v for _, v in points], title=f"{name}: loss")

    # --- polling --------------------------------------------------------------------------------
    def poll(self, seen: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        """Updates for (progress, preview, loss, result, start, interrupt) and the new `seen`."""
        seen = dict(seen or {})
        now = self.snapshot()
        job, _ = self.jobs()
        updates: list[Any] = []

        updates.append(gr.update(value=now.progress_html) if seen.get("progress") != now.progress_html else gr.update())
        preview_key = f"{job.id}:{now.preview}" if job is not None and now.preview else ""  # a rerun reuses names
        if seen.get("preview") != preview_key:
            updates.append(self.preview_update(now.preview))
        else:
            updates.append(gr.update())
        if seen.get("loss") != now.loss_key:
            updates.append(gr.update(value=self.loss_image(job)))
        else:
            updates.append(gr.update())
        updates.append(gr.update(value=now.result_html) if seen.get("result") != now.result_html else gr.update())
        buttons = (not now.busy, now.running)
        if seen.get("buttons") != list(buttons):
            updates += [gr.update(interactive=buttons[0]), gr.update(interactive=buttons[1])]
        else:
            updates += [gr.update(), gr.update()]
        seen.update(
            progress=now.progress_html,
            preview=preview_key,
            loss=now.loss_key,
            result=now.result_html,
            buttons=list(buttons),
            running=now.running,
        )
        return updates, seen

    @staticmethod
    def preview_update(path: Path | None) -> dict[str, Any]:
        if path is None:
            return gr.update(value=None, label="Preview")
        match = _STEP_IN_NAME.search(path.name)
        label = f"Preview at step {int(match.group(1))}" if match else "Preview"
        return gr.update(value=_load_image(path), label=label)
