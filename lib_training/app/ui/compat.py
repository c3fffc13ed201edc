"""The few places where Gradio 3.41 (A1111) and 4.40 (Forge, the standalone app) differ for us.

Everything else in `lib_training.app.ui` uses only what both versions accept: `gr.update(...)` with
arguments both components take, `queue=False`, `show_progress="hidden"`, `elem_id` and
`elem_classes` (when building: 3.41's updates refuse `elem_classes`, see `classes_update`), and no
component newer than 3.41.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])

# Keyword arguments of every event here: not part of Gradio's own API listing (the HTTP API is ours;
# and Gradio 4.40's listing fails on component schemas from pydantic >= 2.11).
PRIVATE = {"api_name": False}
# ... and of the quick ones: off the queue, without a progress overlay.
QUICK = {**PRIVATE, "queue": False, "show_progress": "hidden"}


def classes_update(classes: list[str]) -> dict[str, Any]:
    """Update arguments setting a component's CSS classes: `elem_classes` in 4.x; nothing in 3.41,
    whose updates refuse it (there `javascript/sdwt-training.js` sets the invalid-field class from
    the problem's mark in the field's text)."""
    return {"elem_classes": classes} if GRADIO_MAJOR >= 4 else {}


def js_argument(code: str) -> dict[str, Any]:
    """The keyword argument that attaches browser-side JavaScript to an event: `_js` in 3.x, `js` in 4.x."""
    return {"js": code} if GRADIO_MAJOR >= 4 else {"_js": code}


def run_script_on_load(blocks: gr.Blocks, script: str) -> None:
    """Run `script` once in the browser when `blocks` has loaded (the standalone app's own injection;
    A1111 and Forge inject `javascript/*.js` themselves)."""
    blocks.load(None, None, None, **js_argument("() => {\n" + script + "\n}"))


def choice_values(dropdown: Any) -> list[str]:
    """A dropdown's choice values (4.x keeps (label, value) pairs, 3.x plain values)."""
    return [c[1] if isinstance(c, (tuple, list)) else c for c in dropdown.choices]
