"""Settings forms generated from settings classes: one control per field that `describe()` lists.

Nothing about a field is written here: its label, help text, default, range and choices come from
the `option(...)` declaration, so a new setting or a new training method appears in the UI by
itself. The form reads its controls back into a request body `{"method": .., "data": .., "loop": ..}`
and shows the problems `request_errors` finds under the fields concerned, before anything runs.

Numbers are free-entry fields without Gradio's own bounds (which would refuse a value with a pop-up
instead of a message at the field); small closed ranges become sliders.

Layout: each group's fields fill one wrapping row, as many side by side as the width allows (a path or
a prompt needs more room than a number), its switches last. Help texts show when a field is hovered
or focused (the labels carry a mark); a field's problem shows in red under its input (style.css, on the
form's class `FORM_CLASS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lib_training.app.ui.compat import QUICK, classes_update
from lib_training.options import FieldInfo, describe, range_text
from lib_training.training.method import MethodSpec
from lib_training.training.request import GROUPS, group_settings, request_errors

GROUP_TITLES = {"data": "Dataset", "loop": "Training"}  # "method": the method's own title
SLIDER_INT_SPAN = 200  # whole-number ranges up to this wide are sliders
SLIDER_FLOAT_SPAN = 100.0
ERROR_MARK = "⚠"  # leads a field's problem; javascript/sdwt-training.js marks the field by it
INVALID_CLASS = "sdwt-invalid"  # a control whose value has a problem (red border, red text: style.css)
FORM_CLASS = "sdwt-form"  # a settings form: compact rows, help on hover (style.css)
MIN_WIDTH = {"path": 260, "str": 200}  # px a field needs before its row wraps; other kinds:
MIN_WIDTH_OTHER = 140
MIN_WIDTH_SLIDER = 220  # its label and number box side by side, above the slider


def group_title(spec: MethodSpec, group: str) -> str:
    return spec.title if group == "method" else GROUP_TITLES[group]


def is_slider(info: FieldInfo) -> bool:
    if info.kind not in ("int", "float") or info.min is None or info.max is None:
        return False
    span = info.max - info.min
    return span <= (SLIDER_INT_SPAN if info.kind == "int" else SLIDER_FLOAT_SPAN)


def help_text(info: FieldInfo, problem: str | None = None) -> str:
    """The text under a control: its help (with the range of a free-entry number), or the problem first."""
    text = info.help
    bounds = range_text(info)
    if bounds and not is_slider(info):
        text = f"{text} ({bounds})" if text else bounds
    return f"{ERROR_MARK} {problem.rstrip('.')}. {text}" if problem else text


def field_update(info: FieldInfo, problem: str | None, **changes: Any) -> dict[str, Any]:
    """An update showing a control's problem (the text under its input, and a red border: the class
    `INVALID_CLASS`, styled in style.css) or, without one, its help. The problem alone: it says what
    the field needs, and in a narrow field the help beside it would bury it."""
    if problem:
        return gr.update(info=f"{ERROR_MARK} {problem.rstrip('.')}.", **classes_update([INVALID_CLASS]), **changes)
    return gr.update(info=help_text(info), **classes_update([]), **changes)


def _slider_step(info: FieldInfo) -> float:
    if info.kind == "int":
        return 1
    span = float(info.max - info.min)  # type: ignore[operator]
    return 10 ** math.floor(math.log10(span / 100)) if span > 0 else 0.01


def _display(info: FieldInfo, value: Any) -> Any:
    """A JSON value as its control shows it."""
    if value is None:
        return None if info.kind in ("int", "float") else ("" if info.kind in ("str", "path") else False)
    return value


def min_width(info: FieldInfo) -> int:
    """The width (px) a field's control needs before its row wraps."""
    if is_slider(info):
        return MIN_WIDTH_SLIDER
    return MIN_WIDTH_OTHER if info.choices is not None else MIN_WIDTH.get(info.kind, MIN_WIDTH_OTHER)


def make_control(info: FieldInfo, value: Any, elem_id: str) -> Any:
    """The Gradio component for one field, showing `value`."""
    common = {"label": info.label, "info": help_text(info), "elem_id": elem_id, "min_width": min_width(info)}
    value = _display(info, value)
    if info.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if info.choices is not None:
        return gr.Dropdown(choices=list(info.choices), value=value, **common)
    if is_slider(info):
        return gr.Slider(minimum=info.min, maximum=info.max, step=_slider_step(info), value=value, **common)
    if info.kind in ("int", "float"):
        return gr.Number(value=value, precision=None, **common)
    placeholder = "required" if info.required else ("optional" if info.optional else "")
    return gr.Textbox(value=value, lines=1, max_lines=1, placeholder=placeholder, **common)


def to_json(info: FieldInfo, value: Any) -> Any:
    """A control's value as request JSON (None: leave the field out if it is required)."""
    if info.kind == "bool":
        return bool(value)
    if info.kind in ("int", "float"):
        if value is None or value == "":
            return None
        if info.kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    text = "" if value is None else str(value)
    if text == "" and (info.optional or info.required):
        return None
    return text


@dataclass(frozen=True)
class FieldControl:
    group: str  # "method", "data" or "loop"
    info: FieldInfo
    component: Any  # the Gradio component

    @property
    def key(self) -> str:
        """The dotted name `request_errors` reports it under ("loop.steps")."""
        return f"{self.group}.{self.info.name}"


class SettingsForm:
    """The controls of one method's request groups, built in the current Gradio context.

    `values` pre-fills fields (a request body, e.g. the demo's); the rest show their defaults.
    Basic fields come first in each group, advanced ones in a closed accordion.
    """

    def __init__(self, spec: MethodSpec, values: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.spec = spec
        self.controls: list[FieldControl] = []
        values = values or {}
        with gr.Column(elem_id=self._id("form"), elem_classes=[FORM_CLASS]):
            for group in GROUPS:
                cls, defaults = group_settings(spec, group)
                infos = describe(cls, defaults)
                given = values.get(group, {})
                with gr.Accordion(group_title(spec, group), open=True, elem_id=self._id(group)):
                    self._add_fields(group, [i for i in infos if not i.advanced], given)
                    advanced = [i for i in infos if i.advanced]
                    if advanced:
                        with gr.Accordion("Advanced", open=False, elem_id=self._id(group, "advanced")):
                            self._add_fields(group, advanced, given)

    def _id(self, *parts: str) -> str:
        return "-".join(("sdwt", self.spec.kind, *parts)).replace("_", "-")

    def _add_fields(self, group: str, infos: Sequence[FieldInfo], given: Mapping[str, Any]) -> None:
        def add(info: FieldInfo) -> None:
            value = given.get(info.name, info.default)
            component = make_control(info, value, self._id(group, info.name))
            self.controls.append(FieldControl(group, info, component))

        if infos:
            with gr.Row():  # wraps: as many side by side as fit, the switches last
                for info in sorted(infos, key=lambda info: info.kind == "bool"):
                    add(info)

    # --- reading and checking -------------------------------------------------------------------
    @property
    def components(self) -> list[Any]:
        return [control.component for control in self.controls]

    def body(self, *values: Any) -> dict[str, dict[str, Any]]:
        """The request body from the controls' values (in `components` order)."""
        body: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for control, value in zip(self.controls, values):
            converted = to_json(control.info, value)
            if converted is None and control.info.required:
                continue  # reported as "required"
            body[control.group][control.info.name] = converted
        return body

    def errors(self, body: Mapping[str, Any]) -> dict[str, str]:
        """Problems by dotted field name ("" for the request as a whole)."""
        return request_errors(self.spec, body)

    def field_problem(self, control: FieldControl, value: Any) -> str | None:
        """The problem with one control's value on its own (every check of `request_errors` that needs
        no other field: kind, range, schedule syntax, dataset folder, template), or None."""
        converted = to_json(control.info, value)
        body: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        if converted is not None or not control.info.required:
            body[control.group][control.info.name] = converted
        return request_errors(self.spec, body).get(control.key)

    def label(self, key: str) -> str:
        """'Training › Steps' for 'loop.steps'; unknown keys as they are."""
        for control in self.controls:
            if control.key == key:
                return f"{group_title(self.spec, control.group)} › {control.info.label}"
        group, _, name = key.partition(".")
        if group in GROUPS:
            return f"{group_title(self.spec, group)} › {name or 'settings'}"
        return key or "settings"

    def describe_errors(self, errors: Mapping[str, str]) -> list[str]:
        return [f"{self.label(key)}: {problem}" for key, problem in errors.items()]

    # --- showing --------------------------------------------------------------------------------
    def hint_updates(self, errors: Mapping[str, str]) -> list[dict[str, Any]]:
        """One update per control: its help text, or its problem first and a red border."""
        return [field_update(c.info, errors.get(c.key)) for c in self.controls]

    def fill_updates(self, body: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Updates setting every control to `body`'s value (defaults where it has none), with hints."""
        errors = self.errors(body)
        updates = []
        for control in self.controls:
            group = body.get(control.group, {})
            value = group.get(control.info.name, control.info.default) if isinstance(group, Mapping) else None
            updates.append(field_update(control.info, errors.get(control.key), value=_display(control.info, value)))
        return updates

    def watch(self) -> None:
        """Check each field as the user edits it and show its problem under it (cheap, off the queue)."""
        for control in self.controls:

            def check(value: Any, control: FieldControl = control) -> dict[str, Any]:
                return field_update(control.info, self.field_problem(control, value))

            control.component.input(check, inputs=[control.component], outputs=[control.component], **QUICK)
