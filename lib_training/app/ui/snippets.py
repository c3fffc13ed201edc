"""HTML pieces the tabs share: messages, lists of problems, the progress bar, a failed job's box."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from lib_training.app.jobs import busy_text

ENDED_LABELS = {"finished": "Finished", "interrupted": "Interrupted", "failed": "Failed"}  # job state -> label


def another_job_text(title: str) -> str:
    """What a form says while another job holds the one job slot."""
    return busy_text(title)


def message_html(text: str, kind: str = "info") -> str:
    """A one-line message; `kind` is "info" or "error" (styled by style.css)."""
    return f'<div class="sdwt-{kind}">{html.escape(text)}</div>'


def started_updates(title: str, progress: str, hints: Sequence[Any]) -> list[Any]:
    """A tab's updates once its job started: the message, the progress bar, Start off, Interrupt on, the
    form's field hints (cleared)."""
    import gradio as gr

    start_off, interrupt_on = gr.update(interactive=False), gr.update(interactive=True)
    return [message_html(f"Started {title}."), progress, start_off, interrupt_on, *hints]


def problems_html(lines: Sequence[str]) -> str:
    """The list of problems shown when a request is refused."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f'<div class="sdwt-error"><b>Fix these settings first:</b><ul>{items}</ul></div>'


def progress_html(
    state: str,
    poll_id: str,
    fraction: float,
    parts: Sequence[str],
    phases: Sequence[str] = (),
    current: int = 0,
) -> str:
    """The progress bar of a job: `state` for the page script, `parts` joined under the bar.

    With `phases` (e.g. caching latents, training) the steps of the job are listed above the bar,
    those before `current` ticked off, and the bar measures the current phase alone: it fills once
    per phase instead of filling during one phase and dropping back at the next.
    """
    text = " · ".join(html.escape(part) for part in parts)
    steps = ""
    if phases:
        items = []
        for index, phase in enumerate(phases):
            status = "done" if index < current or state == "finished" else ("now" if index == current else "todo")
            mark = "✓ " if status == "done" else ""
            items.append(
                f'<li data-sdwt-phase-status="{status}">{mark}{index + 1}. {html.escape(phase.capitalize())}</li>'
            )
        steps = f'<ol class="sdwt-phases">{"".join(items)}</ol>'
    phase = html.escape(phases[current]) if phases and current < len(phases) else ""
    return (
        f'<div class="sdwt-progress" data-sdwt-state="{state}" data-sdwt-poll="{poll_id}" data-sdwt-phase="{phase}">'
        f'{steps}<div class="sdwt-progress-track"><div class="sdwt-progress-fill" style="width: {100 * fraction:.1f}%">'
        f'</div></div><div class="sdwt-progress-text">{text}</div></div>'
    )


def failure_html(what: str, error: str | None) -> str:
    """A failed job: the first line of its error, the rest (a traceback) folded away."""
    first, _, rest = (error or "unknown error").partition("\n")
    details = f"<details><summary>Details</summary><pre>{html.escape(rest)}</pre></details>" if rest else ""
    return f'<div class="sdwt-error"><b>{html.escape(what)} failed:</b> {html.escape(first)}{details}</div>'
