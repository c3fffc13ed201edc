"""A method's Create section in its Training sub-tab (`MethodSpec.create`: hypernetworks).

A1111's users create a hypernetwork first (its structure), then train it. The section is a form of
the Create step's fields (generated like every other form, `merge_form.ConfigForm`), a Create
button and a line saying what was written. Create goes through `TrainingService.create`, the same
check as the API's and the CLI's: every bad field is named at once, at its field and in the list
above, before anything is written. The file goes where the host looks for results of the kind (the
app: OUT/KIND/; a WebUI: its folder for them, whose list is refreshed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from lib_training.app.service import TrainingService
from lib_training.app.ui.compat import QUICK
from lib_training.app.ui.merge_form import ConfigForm
from lib_training.app.ui.snippets import message_html, problems_html
from lib_training.errors import UserError
from lib_training.options import SettingsError
from lib_training.training.method import MethodSpec


class CreateSection:
    """The Create accordion of `spec`'s sub-tab, built in the current Gradio context."""

    def __init__(self, service: TrainingService, spec: MethodSpec) -> None:
        step = spec.create
        if step is None:
            raise ValueError(f"{spec.kind} has no create step")
        self.service = service
        self.spec = spec
        prefix = f"sdwt-{spec.kind}-create"
        folder = service.workspace.result_folders()[spec.kind]
        with gr.Accordion(f"Create a new {spec.title.lower()}", open=False, elem_id=prefix):
            gr.Markdown(f"{step.summary} Written to `{folder}`.", elem_id=f"{prefix}-intro")
            self.form = ConfigForm(step.settings, prefix, lambda role: [])
            self.form.section("Settings", step.fields)
            self.button = gr.Button("Create", variant="primary", elem_id=f"{prefix}-button")
            self.status = gr.HTML("", elem_id=f"{prefix}-status")
        self.form.watch()
        fields = self.form.components
        self.button.click(self.create_clicked, fields, [self.status, *fields], **QUICK)

    def create_clicked(self, *values: Any) -> list[Any]:
        """Updates for (status, *fields) after Create with the controls' `values`."""
        try:
            path = self.service.create(self.spec.kind, self.form.body(values))
        except SettingsError as error:
            return [problems_html(self._describe(error.errors)), *self.form.hint_updates(error.errors, values)]
        except UserError as error:
            return [message_html(str(error), "error"), *self.form.hint_updates({}, values)]
        return [message_html(f"Wrote {path}."), *self.form.hint_updates({}, values)]

    def _describe(self, errors: dict[str, str]) -> Sequence[str]:
        return [f"{self.form.label(key) or key}: {problem}" if key else problem for key, problem in errors.items()]
