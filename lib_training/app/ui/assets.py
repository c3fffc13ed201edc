"""The files the page needs besides Python: the browser script and the style sheet.

Both live at the extension's top level, where A1111 and Forge inject them into every page
(`javascript/*.js`, `style.css`); the standalone app reads them from there and injects them itself.
An installed package (`pip install .`) has no top level: `static/` beside this module holds links to
the two files, which a wheel build turns into copies, and is read when the top-level files are absent.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the extension / repository folder
PACKAGED = Path(__file__).resolve().parent / "static"  # the copies an installed package carries


def _find(*parts: str) -> Path:
    top = ROOT.joinpath(*parts)
    return top if top.is_file() else PACKAGED / parts[-1]


SCRIPT = _find("javascript", "sdwt-training.js")
STYLE = _find("style.css")


def script() -> str:
    return SCRIPT.read_text(encoding="utf-8")


def style() -> str:
    return STYLE.read_text(encoding="utf-8")
