"""The Merge tab: Checkpoint merge, LoRA bake, LoRA extract and LoRA resize, each a sub-tab with its
settings form beside its run panel.

The forms are generated from the tools' config classes (`merge_form`). As in the Training tab, every
handler is quick and runs off Gradio's queue: Start validates everything (each bad field is named
under the field) and hands the work to the `JobManager` shared with training, so a merge never runs
beside a training; Interrupt sets the job's stop flag (the output is not written); the page clicks a
hidden poll button about once a second (`javascript/sdwt-training.js`) to follow the progress.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from lib_training.app.merge_service import ROLE_FOLDERS, TOOLS, MergeService, MergeTool
from lib_training.app.service import TrainingService
from lib_training.app.ui.compat import QUICK
from lib_training.app.ui.merge_form import ConfigControl, ConfigForm
from lib_training.app.ui.merge_view import MergeView
from lib_training.app.ui.snippets import message_html, problems_html, started_updates
from lib_training.errors import ConfigError, UserError
from lib_training.merge.methods import MERGE_METHODS
from lib_training.options import SettingsError

ROWS = "rows"  # where a layout places the rows of a list field (the bake's LoRAs)
MAX_ROWS = 5  # LoRAs one bake takes from the form (the API takes any number)

# The sections of each tool's form, in order; the fields not named go to a closed "Advanced" section.
LAYOUTS: dict[str, list[Any]] = {
    "merge": [
        ("Models", ("method", "a", "b", "c")),
        (
            "Ratios",
            (
                "alpha",
                "beta",
                "blocks",
                "blocks_beta",
                "density",
                "seed",
                "unet_alpha",
                "text_encoder_alpha",
                "vae_alpha",
                "weights_clip",
            ),
        ),
        ("Output", ("out", "dtype", "vae", "prune_ema", "overwrite")),
    ],
    "lora/bake": [("Checkpoint", ("model",)), ROWS, ("Output", ("out", "dtype", "prune_ema", "overwrite"))],
    "lora/extract": [
        ("Models", ("base", "tuned")),
        ("LoRA", ("rank", "conv_rank", "clamp_quantile", "min_diff")),
        ("Output", ("out", "dtype", "overwrite")),
    ],
    "lora/resize": [
        ("LoRA", ("lora", "rank", "conv_rank", "dynamic_method", "dynamic_param")),
        ("Output", ("out", "dtype", "overwrite")),
    ],
}
VERBS = {"merge": "Merge", "lora/bake": "Bake", "lora/extract": "Extract", "lora/resize": "Resize"}


def slug(kind: str) -> str:
    """'lora-bake' for 'lora/bake': the part of elem_ids naming a tool."""
    return kind.replace("/", "-")


def intro_text(merges: MergeService) -> str:
    """The tab's header: what it does, where outputs go, the command line."""
    try:
        folder = f"`{merges.workspace.merge_output_folder('checkpoints')}`"
    except ConfigError:
        folder = "the path you give"
    return (
        "Merges stream tensor by tensor: memory stays near one tensor, time near the disk's. "
        f"A relative output name is written to {folder}. Pick models from the lists or type a path. "
        "Command line: `python -m lib_training merge --help`, `python -m lib_training lora bake --help`."
    )


def build_merge_tab(service: TrainingService, merges: MergeService | None = None) -> gr.Blocks:
    """The Merge tab. `merges` defaults to a `MergeService` sharing `service`'s jobs (one job at a time)."""
    merges = merges or MergeService(service.workspace, service.jobs)
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(intro_text(merges), elem_id="sdwt-merge-intro")
        first = slug(next(iter(TOOLS.values())).kind)
        with gr.Tabs(selected=first, elem_id="sdwt-merge-tools"):  # `selected`: no console warning per tab
            for spec in TOOLS.values():
                with gr.Tab(spec.title, id=slug(spec.kind), elem_id=f"sdwt-tool-{slug(spec.kind)}"):
                    ToolPanel(merges, spec)
    return blocks


def _method_note(method: Any) -> str:
    found = MERGE_METHODS.get(str(method))
    return f"{found.name}: {found.formula}" if found else ""


class ToolPanel:
    """One tool's sub-tab: the form (with rows of LoRAs for the bake) and Start / Interrupt with the
    job's progress and result."""

    def __init__(self, merges: MergeService, spec: MergeTool) -> None:
        self.merges = merges
        self.spec = spec
        self.prefix = f"sdwt-{slug(spec.kind)}"
        self.view = MergeView(
            merges, spec, f"{self.prefix}-poll", f"Nothing yet: fill in the settings, then press {VERBS[spec.kind]}."
        )
        self.rows: list[ConfigForm] = []
        self.row_boxes: list[Any] = []
        with gr.Row():
            with gr.Column(scale=3, min_width=420):
                self.form = ConfigForm(spec.config, self.prefix, merges.model_files, notes={"method": _method_note})
                for entry in LAYOUTS.get(spec.kind, []):
                    if entry == ROWS:
                        self._build_rows()
                    else:
                        self.form.section(*entry)
                self.form.rest()
            with gr.Column(scale=2, min_width=340, elem_id=f"{self.prefix}-run"):
                with gr.Row():
                    self.start = gr.Button(
                        VERBS[spec.kind], variant="primary", size="sm", elem_id=f"{self.prefix}-start"
                    )
                    self.interrupt = gr.Button(
                        "Interrupt", variant="stop", size="sm", interactive=False, elem_id=f"{self.prefix}-interrupt"
                    )
                    self.refresh = gr.Button("Refresh model lists", size="sm", elem_id=f"{self.prefix}-refresh")
                self.status = gr.HTML("", elem_id=f"{self.prefix}-status")
                self.progress = gr.HTML(self.view.progress_html(None, None, "idle"), elem_id=f"{self.prefix}-progress")
                self.result = gr.HTML(self.view.result_html(None), elem_id=f"{self.prefix}-result")
                self.poll_button = gr.Button("Refresh", elem_id=self.view.poll_id, elem_classes=["sdwt-hidden"])
                self.seen = gr.State({})
        self._wire()

    def _build_rows(self) -> None:
        name, row = self.spec.rows  # type: ignore[misc]
        with gr.Accordion(name.capitalize() if name != "loras" else "LoRAs", open=True, elem_id=f"{self.prefix}-rows"):
            for index in range(MAX_ROWS):
                with gr.Column(visible=index == 0, elem_id=f"{self.prefix}-row-{index}") as box:
                    form = ConfigForm(
                        row, f"{self.prefix}-{name}-{index}", self.merges.model_files, key=f"{name}.{index}."
                    )
                    form.inline(scales={"path": 3, "strength": 2, "blocks": 2}, labels={"path": f"LoRA {index + 1}"})
                self.rows.append(form)
                self.row_boxes.append(box)
            self.add_row = gr.Button("Add a LoRA", size="sm", elem_id=f"{self.prefix}-add-row")
            self.row_count = gr.State(1)

    # --- wiring -----------------------------------------------------------------------------------
    @property
    def forms(self) -> list[ConfigForm]:
        return [self.form, *self.rows]

    @property
    def fields(self) -> list[Any]:
        return [component for form in self.forms for component in form.components]

    @property
    def pickers(self) -> list[Any]:
        return [component for form in self.forms for component in form.pickers()]

    def _wire(self) -> None:
        for form in self.forms:
            form.watch(self.check_file)
        counted = [self.row_count] if self.rows else []
        self.start.click(
            self.start_clicked,
            [self.seen, *self.fields, *counted],
            [self.status, self.progress, self.start, self.interrupt, *self.fields, self.seen],
            **QUICK,
        )
        self.interrupt.click(self.interrupt_job, None, [self.status], **QUICK)
        self.poll_button.click(
            self.poll,
            [self.seen, *self.pickers],
            [self.progress, self.result, self.start, self.interrupt, self.status, *self.pickers, self.seen],
            **QUICK,
        )
        self.refresh.click(self.refresh_lists, self.pickers, self.pickers, **QUICK)
        method = next((c.component for c in self.form.controls if c.info.name == "method"), None)
        if method is not None:
            method.change(self.form.method_updates, [method], self.form.toggled, **QUICK)
        if self.rows:
            self.add_row.click(
                self.add_lora_row, [self.row_count], [self.row_count, *self.row_boxes, self.add_row], **QUICK
            )

    # --- reading the form -------------------------------------------------------------------------
    def split(self, values: Sequence[Any]) -> tuple[list[list[Any]], int]:
        """The values of each form (main form first, then the rows), and the number of rows shown."""
        values = list(values)
        count = int(values.pop()) if self.rows else 0
        parts, start = [], 0
        for form in self.forms:
            parts.append(values[start : start + len(form.controls)])
            start += len(form.controls)
        return parts, count

    def body(self, values: Sequence[Any]) -> tuple[dict[str, Any], list[int]]:
        """The request body from the controls' values, and which form rows became its rows (in order)."""
        parts, count = self.split(values)
        body = self.form.body(parts[0])
        sent: list[int] = []
        if self.rows:
            name = self.spec.rows[0]  # type: ignore[index]
            filled = [i for i in range(count) if str(parts[1 + i][0] or "").strip()]
            sent = filled or [0]
            body[name] = [self.rows[i].body(parts[1 + i]) for i in sent]
        return body, sent

    @staticmethod
    def form_keys(errors: Mapping[str, str], sent: Sequence[int]) -> dict[str, str]:
        """Errors of the request's rows ("loras.1.path") under the keys of the form rows they came from."""
        keyed = {}
        for key, problem in errors.items():
            parts = key.split(".")
            if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) < len(sent):
                parts[1] = str(sent[int(parts[1])])
            keyed[".".join(parts)] = problem
        return keyed

    def describe_errors(self, errors: Mapping[str, str]) -> list[str]:
        lines = []
        for key, problem in errors.items():
            label = None
            for index, form in enumerate(self.rows):
                found = form.label(key)
                if found is not None:
                    label = found if key.endswith(".path") else f"LoRA {index + 1} › {found}"
            label = label or self.form.label(key) or key
            lines.append(f"{label}: {problem}" if key else problem)
        return lines

    def hint_updates(self, errors: Mapping[str, str], values: Sequence[Any]) -> list[Any]:
        parts, _ = self.split(values)
        return [update for form, part in zip(self.forms, parts) for update in form.hint_updates(errors, part)]

    def check_file(self, control: ConfigControl, value: Any) -> str | None:
        """Inline: a picked or typed model file must exist."""
        text = str(value or "").strip()
        if control.info.role not in ROLE_FOLDERS or not text:
            return None
        if not Path(self.merges.resolve_input(control.info.role, text)).is_file():
            return f"no such file: {text}"
        return None

    # --- handlers (quick: they never wait for the job) -----------------------------------------------
    def start_job(self, *values: Any) -> list[Any]:
        """Updates for (status, progress, start, interrupt, *fields) after Start with the controls' `values`."""
        return self._start(values)[0]

    def start_clicked(self, seen: dict[str, Any] | None, *values: Any) -> list[Any]:
        """`start_job`, and what the poll has seen: a job that ends before the next poll must still
        be seen running once, or the buttons Start set would never be reset."""
        updates, started = self._start(values)
        if started:
            seen = {**(seen or {}), "progress": updates[1], "buttons": [False, True], "running": True}
        return [*updates, seen or {}]

    def _start(self, values: Sequence[Any]) -> tuple[list[Any], bool]:
        body, sent = self.body(values)
        unchanged = [gr.update(), gr.update(), gr.update()]
        try:
            job = self.merges.start(self.spec.kind, body)
        except SettingsError as error:
            errors = self.form_keys(error.errors, sent)
            return [problems_html(self.describe_errors(errors)), *unchanged, *self.hint_updates(errors, values)], False
        except UserError as error:  # another job runs, or the host refused
            return [message_html(str(error), "error"), *unchanged, *self.hint_updates({}, values)], False
        return started_updates(job.title, self.view.snapshot().progress_html, self.hint_updates({}, values)), True

    def interrupt_job(self) -> str:
        job, _ = self.view.jobs()
        if job is None or not job.running:
            return message_html(f"Nothing to interrupt: no {self.spec.title.lower()} is going on.")
        self.merges.jobs.cancel(job.id)
        return message_html("Stopping: the output file will not be written.")

    def poll(self, seen: dict[str, Any] | None, *pickers: Any) -> list[Any]:
        updates, seen, ended = self.view.poll(seen)
        status = gr.update(value="") if ended else gr.update()  # "Started ..." is over; the result says the rest
        lists = self.refresh_lists(*pickers) if ended else [gr.update() for _ in pickers]
        return [*updates, status, *lists, seen]

    def refresh_lists(self, *values: Any) -> list[Any]:
        updates: list[Any] = []
        start = 0
        for form in self.forms:
            count = len(form.pickers())
            updates += form.choice_updates(values[start : start + count])
            start += count
        return updates

    def add_lora_row(self, count: int) -> list[Any]:
        count = min(int(count or 1) + 1, MAX_ROWS)
        boxes = [gr.update(visible=index < count) for index in range(MAX_ROWS)]
        return [count, *boxes, gr.update(interactive=count < MAX_ROWS)]
