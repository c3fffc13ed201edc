"""The Training tab: one sub-tab per registered training method, a settings form beside its run panel,
then one that makes aesthetic embeddings (`aesthetic_tab`).

Every handler here is quick and runs off Gradio's queue (`queue=False`): starting validates and
hands the work to the `JobManager`'s thread; interrupting sets a flag; the panel learns about
progress when the page clicks a hidden poll button about once a second (`javascript/sdwt-training.js`).
So nothing waits behind a long event, whatever the host's queue allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr

from lib_training.app.jobs import JobBusyError
from lib_training.app.service import TrainingService
from lib_training.app.ui import aesthetic_tab
from lib_training.app.ui.compat import QUICK
from lib_training.app.ui.create_section import CreateSection
from lib_training.app.ui.form import SettingsForm
from lib_training.app.ui.run_view import RunView
from lib_training.app.ui.runs import load_run_settings, run_configs
from lib_training.app.ui.snippets import message_html, problems_html, started_updates
from lib_training.errors import UserError
from lib_training.methods import registered
from lib_training.options import SettingsError
from lib_training.training.method import MethodSpec

Body = Mapping[str, Mapping[str, Any]]


def build_training_tab(service: TrainingService, presets: Mapping[str, Body] | None = None) -> gr.Blocks:
    """The Training tab. `presets` pre-fills methods' forms by kind (request bodies)."""
    specs = registered()
    first = next(iter(specs))  # Tabs need `selected`: without it Gradio 4 warns in the console at every tab
    with gr.Blocks(analytics_enabled=False) as blocks, gr.Tabs(selected=first, elem_id="sdwt-training-methods"):
        for kind, spec in specs.items():
            with gr.Tab(spec.title, id=kind, elem_id=f"sdwt-train-{kind}"):
                MethodPanel(service, spec, (presets or {}).get(kind))
        with gr.Tab(aesthetic_tab.TITLE, id="aesthetic", elem_id=f"{aesthetic_tab.PREFIX}-tab"):
            aesthetic_tab.AestheticCreatePanel(service.aesthetic)
    return blocks


class MethodPanel:
    """One method's sub-tab: its Create section (methods with a create step), load earlier settings,
    the form, and Preview / Start / Interrupt with the run's progress, previews, loss plot and result."""

    def __init__(self, service: TrainingService, spec: MethodSpec, preset: Body | None = None) -> None:
        self.service = service
        self.spec = spec
        kind = spec.kind
        self.view = RunView(service, spec, poll_id=f"sdwt-{kind}-poll")
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                self.create = CreateSection(service, spec) if spec.create is not None else None
                self._build_loader()
                self.form = SettingsForm(spec, preset)
            with gr.Column(scale=2, min_width=340, elem_id=f"sdwt-{kind}-run"):
                with gr.Row():
                    button = {"size": "sm", "min_width": 100}
                    self.check = gr.Button("Preview dataset", elem_id=f"sdwt-{kind}-check", **button)
                    self.start = gr.Button("Start training", variant="primary", elem_id=f"sdwt-{kind}-start", **button)
                    self.interrupt = gr.Button(
                        "Interrupt", variant="stop", interactive=False, elem_id=f"sdwt-{kind}-interrupt", **button
                    )
                self.resume = gr.Checkbox(
                    False,
                    label="Resume the saved run",
                    info="Continue the run of this name from its saved state instead of starting over.",
                    elem_id=f"sdwt-{kind}-resume",
                )
                self.status = gr.HTML("", elem_id=f"sdwt-{kind}-status")
                self.progress = gr.HTML(self.view.progress_html(None, None, "idle"), elem_id=f"sdwt-{kind}-progress")
                with gr.Row():
                    image = {"interactive": False, "height": 256, "min_width": 160}
                    self.preview = gr.Image(label="Preview", scale=2, elem_id=f"sdwt-{kind}-preview", **image)
                    self.loss = gr.Image(label="Loss", scale=3, elem_id=f"sdwt-{kind}-loss", **image)
                self.result = gr.HTML("", elem_id=f"sdwt-{kind}-result")
                with gr.Accordion("Dataset preview", open=True):
                    self.summary = gr.Textbox(
                        label="Dataset", lines=4, max_lines=12, interactive=False, elem_id=f"sdwt-{kind}-summary"
                    )
                    self.samples = gr.Gallery(
                        label="Samples and their prompts",
                        columns=4,
                        height=None,  # as tall as the samples need: every one shown, none cut off
                        object_fit="contain",
                        elem_id=f"sdwt-{kind}-samples",
                    )
                self.poll_button = gr.Button("Refresh", elem_id=self.view.poll_id, elem_classes=["sdwt-hidden"])
                self.seen = gr.State({})
        self._wire()

    def _build_loader(self) -> None:
        kind = self.spec.kind
        with gr.Accordion("Load settings from a previous run", open=False, elem_id=f"sdwt-{kind}-loader"):
            with gr.Row():
                self.runs = gr.Dropdown(
                    choices=self._run_choices(),
                    label="Earlier runs",
                    info="The config.json of runs in the outputs, newest first.",
                    elem_id=f"sdwt-{kind}-runs",
                )
                self.refresh_runs = gr.Button("Refresh list", size="sm", elem_id=f"sdwt-{kind}-refresh-runs")
            with gr.Row():
                self.config_path = gr.Textbox(
                    label="Settings file",
                    placeholder="a run's config.json or folder",
                    elem_id=f"sdwt-{kind}-config-path",
                )
                self.load = gr.Button("Load settings", size="sm", elem_id=f"sdwt-{kind}-load")

    def _run_choices(self) -> list[str]:
        return [str(path) for path in run_configs(self.service, self.spec)]

    def _wire(self) -> None:
        fields = self.form.components
        self.form.watch()
        self.check.click(self.preview_dataset, fields, [self.status, self.summary, self.samples, *fields], **QUICK)
        self.start.click(
            self.start_clicked,
            [self.seen, *fields, self.resume],
            [self.status, self.progress, self.start, self.interrupt, *fields, self.seen],
            **QUICK,
        )
        self.interrupt.click(self.interrupt_training, None, [self.status], **QUICK)
        self.poll_button.click(
            self.poll,
            [self.seen],
            [self.progress, self.preview, self.loss, self.result, self.start, self.interrupt, self.status, self.seen],
            **QUICK,
        )
        self.refresh_runs.click(lambda: gr.update(choices=self._run_choices()), None, [self.runs], **QUICK)
        self.runs.change(lambda path: path or gr.update(), [self.runs], [self.config_path], **QUICK)
        self.load.click(self.load_settings, [self.config_path], [self.status, *fields], **QUICK)

    # --- handlers (quick: they never wait for training) --------------------------------------------
    def _problems(self, errors: Mapping[str, str]) -> str:
        return problems_html(self.form.describe_errors(errors))

    def preview_dataset(self, *values: Any) -> list[Any]:
        body = self.form.body(*values)
        errors = self.form.errors(body)
        if errors:
            return [self._problems(errors), gr.update(), gr.update(), *self.form.hint_updates(errors)]
        hints = self.form.hint_updates({})
        try:
            preview = self.service.preview_dataset(self.spec.kind, body)
        except SettingsError as error:
            return [self._problems(error.errors), gr.update(), gr.update(), *self.form.hint_updates(error.errors)]
        except UserError as error:
            return [message_html(str(error), "error"), "", [], *hints]
        shown = len(preview["samples"])
        note = f"Dataset looks good; {shown} sample{'s' if shown != 1 else ''} shown below."
        return [message_html(note), preview["summary"], preview["samples"], *hints]

    def start_clicked(self, seen: dict[str, Any] | None, *values: Any) -> list[Any]:
        """`start_training`, and what the poll has seen: a run that ends before the next poll must
        still be seen running once, or the buttons Start set would never be reset."""
        updates, started = self._start(values)
        if started:
            seen = {**(seen or {}), "progress": updates[1], "buttons": [False, True], "running": True}
        return [*updates, seen or {}]

    def start_training(self, *values: Any) -> list[Any]:
        """Validate the form and start the run; updates for (status, progress, start, interrupt, hints...)."""
        return self._start(values)[0]

    def _start(self, values: Sequence[Any]) -> tuple[list[Any], bool]:
        *fields, resume = values
        body = self.form.body(*fields)
        unchanged = [gr.update(), gr.update(), gr.update()]
        errors = self.form.errors(body)
        if errors:
            return [self._problems(errors), *unchanged, *self.form.hint_updates(errors)], False
        hints = self.form.hint_updates({})
        try:
            request = self.service.parse(self.spec.kind, {**body, "resume": bool(resume)})
            request.data.validate()
            job = self.service.start_training(self.spec.kind, request)
        except SettingsError as error:
            return [self._problems(error.errors), *unchanged, *self.form.hint_updates(error.errors)], False
        except JobBusyError as error:
            return [message_html(str(error), "error"), *unchanged, *hints], False
        except UserError as error:
            return [message_html(str(error), "error"), *unchanged, *hints], False
        return started_updates(job.title, self.view.snapshot().progress_html, hints), True

    def interrupt_training(self) -> str:
        job, _ = self.view.jobs()
        if job is None or not job.running:
            return message_html("Nothing to interrupt: no run of this method is going on.")
        self.service.jobs.cancel(job.id)
        return message_html("Stopping: the run saves its result at the end of this step.")

    def poll(self, seen: dict[str, Any] | None) -> list[Any]:
        was_running = bool((seen or {}).get("running"))
        updates, seen = self.view.poll(seen)
        ended = was_running and not seen["running"]
        status = gr.update(value="") if ended else gr.update()  # "Started ..." is over; the result says the rest
        return [*updates, status, seen]

    def load_settings(self, path: str) -> list[Any]:
        fields = [gr.update() for _ in self.form.controls]
        if not (path or "").strip():
            return [message_html("Pick an earlier run, or give the path of a run's config.json.", "error"), *fields]
        try:
            loaded = load_run_settings(path, self.spec)
        except UserError as error:
            return [message_html(str(error), "error"), *fields]
        note = f"Loaded the settings of {path.strip()}."
        if loaded.skipped:
            note += f" Not loaded (no longer settings): {', '.join(loaded.skipped)}."
        return [message_html(note), *self.form.fill_updates(loaded.body)]
