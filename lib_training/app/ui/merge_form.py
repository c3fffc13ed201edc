"""Settings forms of the Merge tab, generated from the merge tools' config classes.

As in the Training tab's `SettingsForm`, each control comes from a field's `option(...)` declaration
(`lib_training.options.describe`) and is made by the same functions (`make_control`, `help_text`,
`to_json`). What merges add:

- text fields with the role "model", "lora" or "vae" are dropdowns of the files found in the
  workspace's model folders, which also take a typed path;
- "blocks" fields are dropdowns of the block-weight presets, which also take typed values;
- optional numbers ("empty: alpha") are text fields that may stay empty;
- fields with `used_by` show only for the merge methods that use them (`visible_fields`).

The panel lays the fields out in titled sections (`section`, then `rest` for the fields not placed),
so a field added to a config later still appears.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lib_training.app.merge_service import ROLE_FOLDERS, field_used
from lib_training.app.ui.compat import QUICK
from lib_training.app.ui.form import help_text, is_slider, make_control, range_text, to_json
from lib_training.merge.blocks import PRESETS
from lib_training.options import FieldInfo, describe, field_errors

WIDE_ROLES = (*ROLE_FOLDERS, "output")  # paths: a row each
Notes = Mapping[str, Callable[[Any], str]]  # field name -> text added to its help for a value


def visible_fields(cls: type, method: str | None) -> list[str]:
    """The fields of `cls` a form shows for a merge method (all of them when `method` is None)."""
    return [info.name for info in describe(cls) if field_used(info, method)]


def file_choices(files: Sequence[str], value: str) -> list[str]:
    """A picker's choices: the files found, and the current value if it is typed rather than found."""
    return list(files) if not value or value in files else [value, *files]


@dataclass(frozen=True)
class ConfigControl:
    info: FieldInfo
    component: Any
    key: str  # the name its problems are reported under: "a", "loras.0.path"


class ConfigForm:
    """Controls for the fields of one settings class, built in the current Gradio context.

    `files(role)` lists the model files a picker offers; `prefix` starts every elem_id and `key`
    every error key ("loras.0."); `notes` adds text to a field's help from its value (a merge
    method's formula).
    """

    def __init__(
        self,
        cls: type,
        prefix: str,
        files: Callable[[str], list[str]],
        *,
        key: str = "",
        values: Mapping[str, Any] | None = None,
        notes: Notes | None = None,
    ) -> None:
        self.cls = cls
        self.prefix = prefix
        self.files = files
        self.key_prefix = key
        self.values = dict(values or {})
        self.notes = dict(notes or {})
        self.infos = {info.name: info for info in describe(cls)}
        self.controls: list[ConfigControl] = []
        self.labels: dict[str, str] = {}  # field name -> label other than its own
        self.method_rows: list[tuple[Any, list[FieldInfo]]] = []  # rows of fields only some methods use
        self.compact = False
        method = self.values.get("method", self.infos["method"].default if "method" in self.infos else None)
        self.method: str | None = method

    # --- building ---------------------------------------------------------------------------------
    def section(self, title: str, names: Sequence[str], *, open: bool = True) -> None:
        """An accordion of the named fields (those not placed yet): paths a row each, others in pairs,
        checkboxes in threes."""
        infos = [self.infos[n] for n in names if n in self.infos and n not in self.placed]
        if not infos:
            return
        with gr.Accordion(title, open=open, elem_id=self._id("section", title.lower())):
            pair: list[FieldInfo] = []
            for info in [i for i in infos if i.kind != "bool"]:
                if info.role in WIDE_ROLES:
                    self._row(pair)
                    pair = []
                    self._row([info])
                else:
                    pair.append(info)
                    if len(pair) == 2:
                        self._row(pair)
                        pair = []
            self._row(pair)
            flags = [i for i in infos if i.kind == "bool"]
            for start in range(0, len(flags), 3):
                self._row(flags[start : start + 3])

    def rest(self, title: str = "Advanced", *, open: bool = False) -> None:
        """A section of every field not placed yet (closed by default)."""
        self.section(title, list(self.infos), open=open)

    def inline(self, *, scales: Mapping[str, int] | None = None, labels: Mapping[str, str] | None = None) -> None:
        """All fields not placed yet in one row (the rows of a list such as the bake's LoRAs), with
        relative widths `scales` and labels `labels` other than the fields' own."""
        self.labels.update(labels or {})
        self.compact = True  # numbers as free-entry fields: a slider does not fit a narrow column
        with gr.Row(equal_height=True):
            for info in self.infos.values():
                if info.name not in self.placed:
                    self._add(info, scale=(scales or {}).get(info.name, 1))

    @property
    def placed(self) -> set[str]:
        return {control.info.name for control in self.controls}

    def _row(self, infos: Sequence[FieldInfo]) -> None:
        if not infos:
            return
        # a row of fields some methods do not use is hidden with them (an empty row still takes room)
        methodical = all(info.used_by is not None for info in infos)
        visible = not methodical or any(field_used(info, self.method) for info in infos)
        with gr.Row(visible=visible) as row:
            for info in infos:
                self._add(info)
        if methodical:
            self.method_rows.append((row, list(infos)))

    def _id(self, *parts: str) -> str:
        return "-".join((self.prefix, *parts)).replace("_", "-").replace(" ", "-")

    def _add(self, info: FieldInfo, scale: int = 1) -> None:
        value = self.values.get(info.name, info.default)
        component = self._make(info, value, self._id(info.name), scale)
        self.controls.append(ConfigControl(info, component, self.key_prefix + info.name))

    def _make(self, info: FieldInfo, value: Any, elem_id: str, scale: int) -> Any:
        common = {
            "label": self.labels.get(info.name, info.label),
            "info": self.help(info, None, value),
            "elem_id": elem_id,
            "visible": field_used(info, self.method),
            "scale": scale,
        }
        if info.role in ROLE_FOLDERS or info.role == "blocks":
            text = "" if value is None else str(value)
            choices = file_choices(self.files(info.role), text) if info.role in ROLE_FOLDERS else list(PRESETS)
            # None, not "": Gradio 4 shows its first choice for "" (while sending "")
            return gr.Dropdown(choices=choices, value=text or None, allow_custom_value=True, **common)
        if self.compact and info.kind in ("int", "float") and not info.optional:
            return gr.Number(value=value, precision=0 if info.kind == "int" else None, **common)
        if info.optional and info.kind in ("int", "float"):
            # a text field: Gradio's number fields show 0 for no value, and send it
            text = "" if value is None else str(value)
            return gr.Textbox(value=text, lines=1, max_lines=1, placeholder="empty", **common)
        component = make_control(info, value, elem_id)
        for name in ("label", "info", "visible", "scale"):
            setattr(component, name, common[name])
        return component

    # --- reading and checking -------------------------------------------------------------------
    @property
    def components(self) -> list[Any]:
        return [control.component for control in self.controls]

    def pickers(self) -> list[Any]:
        """The model-file dropdowns."""
        return [c.component for c in self.controls if c.info.role in ROLE_FOLDERS]

    def help(self, info: FieldInfo, problem: str | None, value: Any = None) -> str:
        """The text under a control: help (with the range of a free number), a note on its value, or
        the problem first."""
        text = help_text(info, problem)
        if (info.optional or self.compact) and is_slider(info):  # a free-entry field here: say its range
            text = f"{text} ({range_text(info)})"
        note = self.notes.get(info.name)
        if note is not None and value is not None:
            text = f"{text}. {note(value)}"
        return text

    def method_of(self, values: Sequence[Any]) -> str | None:
        """The merge method the controls' `values` choose (None for a config without methods)."""
        for control, value in zip(self.controls, values):
            if control.info.name == "method":
                return value
        return None

    def body(self, values: Sequence[Any]) -> dict[str, Any]:
        """Request settings from the controls' values (in `components` order); fields the method does
        not use are left out, and so are empty required ones (reported as "required")."""
        method = self.method_of(values)
        body: dict[str, Any] = {}
        for control, value in zip(self.controls, values):
            if not field_used(control.info, method):
                continue
            converted = to_json(control.info, value)
            if converted is None and control.info.required:
                continue
            body[control.info.name] = converted
        return body

    def field_problem(self, control: ConfigControl, value: Any) -> str | None:
        """The problem with one control's value on its own, or None."""
        converted = to_json(control.info, value)
        data = {} if converted is None and control.info.required else {control.info.name: converted}
        return field_errors(self.cls, data).get(control.info.name)

    # --- showing --------------------------------------------------------------------------------
    def hint_updates(self, errors: Mapping[str, str], values: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """One update per control: its help text, or its problem first."""
        values = list(values) if values is not None else [None] * len(self.controls)
        return [gr.update(info=self.help(c.info, errors.get(c.key), value)) for c, value in zip(self.controls, values)]

    @property
    def toggled(self) -> list[Any]:
        """What a method change updates: every control, then the rows of fields only some methods use."""
        return [*self.components, *(row for row, _ in self.method_rows)]

    def method_updates(self, method: str) -> list[dict[str, Any]]:
        """Updates of `toggled` for a newly chosen method: shown or hidden, the method's note."""
        updates = []
        for control in self.controls:
            if control.info.name == "method":
                updates.append(gr.update(visible=True, info=self.help(control.info, None, method)))
            else:
                updates.append(gr.update(visible=field_used(control.info, method)))
        for _, infos in self.method_rows:
            updates.append(gr.update(visible=any(field_used(info, method) for info in infos)))
        return updates

    def choice_updates(self, values: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """One update per picker (`pickers()` order): the files found now."""
        pickers = [c for c in self.controls if c.info.role in ROLE_FOLDERS]
        current = list(values) if values is not None else [""] * len(pickers)
        return [
            gr.update(choices=file_choices(self.files(c.info.role), value or ""))  # type: ignore[arg-type]
            for c, value in zip(pickers, current)
        ]

    def label(self, key: str) -> str | None:
        """The label of the control whose problems are reported under `key`, or None."""
        for control in self.controls:
            if control.key == key:
                return self.labels.get(control.info.name, control.info.label)
        return None

    def watch(self, check: Callable[[ConfigControl, Any], str | None] | None = None) -> None:
        """Check each field as it is edited and show its problem under it (cheap, off the queue).
        `check` adds a check of its own (e.g. that a picked file exists)."""
        for control in self.controls:

            def on_input(value: Any, control: ConfigControl = control) -> dict[str, Any]:
                problem = self.field_problem(control, value)
                if problem is None and check is not None:
                    problem = check(control, value)
                return gr.update(info=self.help(control.info, problem, value))

            control.component.input(on_input, inputs=[control.component], outputs=[control.component], **QUICK)
