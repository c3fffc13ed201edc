"""The Training tab's "Aesthetic embedding" sub-tab: make an aesthetic embedding (the mean CLIP image
feature of a folder of images) from a form, as a job.

The form is generated from `CreateConfig` (`merge_form.ConfigForm`), and the run panel is the Merge
tab's: Start validates everything (each bad field is named under the field) and hands the work to the
service's `JobManager` (one job at a time); Interrupt sets the job's stop flag; the page clicks a
hidden poll button about once a second (`javascript/sdwt-training.js`) to follow the progress.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from lib_training.app.aesthetic_service import JOB_KIND, AestheticService, CreateConfig
from lib_training.app.jobs import Job
from lib_training.app.ui.compat import QUICK
from lib_training.app.ui.merge_form import ConfigControl, ConfigForm
from lib_training.app.ui.merge_view import JobView
from lib_training.app.ui.snippets import failure_html, message_html, problems_html, started_updates
from lib_training.errors import UserError
from lib_training.options import SettingsError

PREFIX = "sdwt-aesthetic"
TITLE = "Aesthetic embedding"


def intro_text(aesthetic: AestheticService) -> str:
    where = f"`{aesthetic.folders[0]}`" if aesthetic.folders else "the output folder you give"
    return (
        "An aesthetic embedding is the mean CLIP image feature of a folder of images; pick it in the "
        f"Aesthetic gradients accordion when generating. Written to {where} unless you give an output folder. "
        "Command line: `python -m lib_training aesthetic create --help`."
    )


class AestheticView(JobView):
    """Progress in images encoded; the result is the embedding file written."""

    unit = "images"

    def result_html(self, job: Job | None) -> str:
        if job is None or job.running:
            return ""
        if job.state == "failed":
            return failure_html(job.title, job.error)
        if job.result.get("cancelled"):
            return '<div class="sdwt-info">Interrupted: no embedding was written.</div>'
        path = html.escape(str(job.result.get("result", "")))
        facts = f"{job.result.get('images', 0)} images, features {job.result.get('width', 0)} wide"
        return (
            f'<div class="sdwt-result" data-sdwt-result="{path}"><b>Result</b>: <code>{path}</code><br>'
            f"{html.escape(facts)}</div>"
        )


class AestheticCreatePanel:
    """The sub-tab: the form beside Create / Interrupt with the job's progress and result."""

    def __init__(self, aesthetic: AestheticService) -> None:
        self.aesthetic = aesthetic
        self.view = AestheticView(
            aesthetic.jobs, JOB_KIND, f"{PREFIX}-poll", "Nothing yet: give a folder of images and a name, then Create."
        )
        gr.Markdown(intro_text(aesthetic), elem_id=f"{PREFIX}-intro")
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                self.form = ConfigForm(CreateConfig, PREFIX, lambda role: [])
                self.form.section("Embedding", ("data", "name", "out", "overwrite"))
                self.form.section("CLIP model", ("clip_model", "clip_weights"))
                self.form.rest()
            with gr.Column(scale=2, min_width=340, elem_id=f"{PREFIX}-run"):
                with gr.Row():
                    self.start = gr.Button("Create", variant="primary", size="sm", elem_id=f"{PREFIX}-start")
                    self.interrupt = gr.Button(
                        "Interrupt", variant="stop", size="sm", interactive=False, elem_id=f"{PREFIX}-interrupt"
                    )
                self.status = gr.HTML("", elem_id=f"{PREFIX}-status")
                self.progress = gr.HTML(self.view.progress_html(None, None, "idle"), elem_id=f"{PREFIX}-progress")
                self.result = gr.HTML("", elem_id=f"{PREFIX}-result")
                self.poll_button = gr.Button("Refresh", elem_id=self.view.poll_id, elem_classes=["sdwt-hidden"])
                self.seen = gr.State({})
        self._wire()

    def _wire(self) -> None:
        fields = self.form.components
        self.form.watch(check_path)
        self.start.click(
            self.start_clicked,
            [self.seen, *fields],
            [self.status, self.progress, self.start, self.interrupt, *fields, self.seen],
            **QUICK,
        )
        self.interrupt.click(self.interrupt_job, None, [self.status], **QUICK)
        self.poll_button.click(
            self.poll, [self.seen], [self.progress, self.result, self.start, self.interrupt, self.status, self.seen],
            **QUICK,
        )  # fmt: skip

    # --- handlers (quick: they never wait for the job) -----------------------------------------------
    def describe_errors(self, errors: Mapping[str, str]) -> list[str]:
        return [f"{self.form.label(key) or key}: {problem}" if key else problem for key, problem in errors.items()]

    def start_job(self, *values: Any) -> list[Any]:
        """Updates for (status, progress, start, interrupt, *fields) after Create with the controls' `values`."""
        return self._start(values)[0]

    def start_clicked(self, seen: dict[str, Any] | None, *values: Any) -> list[Any]:
        """`start_job`, and what the poll has seen: a job that ends before the next poll must still
        be seen running once, or the buttons Create set would never be reset."""
        updates, started = self._start(values)
        if started:
            seen = {**(seen or {}), "progress": updates[1], "buttons": [False, True], "running": True}
        return [*updates, seen or {}]

    def field_errors(self, values: Sequence[Any]) -> dict[str, str]:
        """Each field's problem on its own (required, range, a missing folder or file), before the service is asked."""
        errors = {}
        for control, value in zip(self.form.controls, values):
            problem = self.form.field_problem(control, value) or check_path(control, value)
            if problem is not None:
                errors[control.key] = problem
        return errors

    def _start(self, values: Sequence[Any]) -> tuple[list[Any], bool]:
        unchanged = [gr.update(), gr.update(), gr.update()]
        errors = self.field_errors(values)
        if errors:
            hints = self.form.hint_updates(errors, values)
            return [problems_html(self.describe_errors(errors)), *unchanged, *hints], False
        try:
            job = self.aesthetic.start_create(self.form.body(values))
        except SettingsError as error:
            hints = self.form.hint_updates(error.errors, values)
            return [problems_html(self.describe_errors(error.errors)), *unchanged, *hints], False
        except UserError as error:  # another job runs
            return [message_html(str(error), "error"), *unchanged, *self.form.hint_updates({}, values)], False
        return started_updates(job.title, self.view.snapshot().progress_html, self.form.hint_updates({}, values)), True

    def interrupt_job(self) -> str:
        job, _ = self.view.jobs()
        if job is None or not job.running:
            return message_html("Nothing to interrupt: no aesthetic embedding is being made.")
        self.aesthetic.jobs.cancel(job.id)
        return message_html("Stopping: no embedding will be written.")

    def poll(self, seen: dict[str, Any] | None) -> list[Any]:
        updates, seen, ended = self.view.poll(seen)
        status = gr.update(value="") if ended else gr.update()  # "Started ..." is over; the result says the rest
        return [*updates, status, seen]


def check_path(control: ConfigControl, value: Any) -> str | None:
    """Inline: the image folder and a CLIP weights file, when given, must exist."""
    text = str(value or "").strip()
    if not text:
        return None
    if control.info.name == "data" and not Path(text).is_dir():
        return f"folder not found: {text}"
    if control.info.name == "clip_weights" and not Path(text).is_file():
        return f"file not found: {text}"
    return None
