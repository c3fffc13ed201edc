"""The files the page needs besides Python: the browser script and the style sheet.

Both live at the extension's top level, where A1111 and Forge inject them into every page
(`javascript/*.js`, `style.css`); the standalone app reads them from there and injects them itself.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the extension / repository folder
SCRIPT = ROOT / "javascript" / "sdwt-training.js"
STYLE = ROOT / "style.css"


def script() -> str:
    return SCRIPT.read_text(encoding="utf-8")


def style() -> str:
    return STYLE.read_text(encoding="utf-8")
