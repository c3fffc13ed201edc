"""What the standalone page tells Gradio 4.40's browser client, so that its console stays quiet.

Two of that client's checks warn about pages that are right (both fixed in later Gradio releases),
and would warn about every page we serve:

- "Too many arguments provided for the endpoint", at every event that has inputs: the client counts
  an event's inputs against the parameters `/info` lists under the event's number (its
  `unnamed_endpoints`), which Gradio 4.40's server never fills. `QuietPage` lists every event of
  the page there (in `/info` and in the listing the page embeds), one parameter per input (what its
  function takes), and nothing more: no types, so the client treats the values as it does without one.
- "Attempted to select a non-interactive or hidden tab", once per tab group: a group given its
  `selected` tab tries to select it before any of its tabs exists; without one it tries "nothing"
  at every tab. `QuietPage` sends `selected: null` (which Gradio's config leaves out for None)
  where a group names its first tab, which the group shows first by itself.

The WebUIs serve their own page (A1111's Gradio 3.41 has neither check; Forge's page has them for
each of its own events and tabs too), so this is the standalone app's.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from lib_training.app.ui.compat import GRADIO_MAJOR


def unnamed_endpoints(config: dict[str, Any]) -> dict[str, Any]:
    """A Gradio 4 page `config`'s events by their number, each with one parameter per input."""
    unnamed = {}
    for dependency in config.get("dependencies", []):
        if not dependency.get("backend_fn"):
            continue  # browser-only (js) events send nothing to the server
        parameters = [
            {
                "label": f"input {index}",
                "parameter_name": f"param_{index}",
                "parameter_has_default": True,
                "parameter_default": None,
                "type": {},
                "python_type": {"type": "Any", "description": ""},
            }
            for index, _ in enumerate(dependency.get("inputs", []))
        ]
        unnamed[str(dependency["id"])] = {"parameters": parameters, "returns": []}
    return unnamed


def _first_tab_id(tabs: Any) -> Any:
    for child in getattr(tabs, "children", []):
        if type(child).__name__ in ("Tab", "TabItem"):
            return child.id
    return None


class QuietPage(gr.Blocks):
    """A `gr.Blocks` page whose events are listed by number for its client, and whose tab groups that
    name their first tab as `selected` reach the browser with `selected: null` (see the module's
    docstring). Under Gradio 3 it is a plain `gr.Blocks`."""

    def get_api_info(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        info = super().get_api_info(*args, **kwargs)
        if GRADIO_MAJOR < 4:
            return info
        info = info or {"named_endpoints": {}, "unnamed_endpoints": {}}
        return {**info, "unnamed_endpoints": {**unnamed_endpoints(self.config), **info.get("unnamed_endpoints", {})}}

    def get_config_file(self) -> dict[str, Any]:
        config = super().get_config_file()
        if GRADIO_MAJOR < 4:
            return config
        first_selected = {
            block._id
            for block in self.blocks.values()
            if isinstance(block, gr.Tabs) and block.selected is not None and block.selected == _first_tab_id(block)
        }
        for component in config.get("components", []):
            if component.get("id") in first_selected:
                component.setdefault("props", {})["selected"] = None
        return config
