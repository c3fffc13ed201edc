"""Prompt templates: text files of prompt lines with `[name]` and `[filewords]` placeholders.

`[name]` becomes the name being trained (the embedding's token), `[filewords]` the image's caption.
A template is one prompt per line; blank lines are ignored. Built-in templates live in the
`templates/` folder beside this module and are chosen by name; any other value is read as the path
of a user's text file.

When the caption is empty (no caption, or dropped by caption dropout) `[filewords]` is removed
together with the comma that joins it to the rest of the line, so "a photo of a [name], [filewords]"
becomes "a photo of a NAME"; the `[name]` part always stays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lib_training.dataset.errors import TemplateError

TEMPLATE_DIR = Path(__file__).parent / "templates"
NAME = "[name]"
FILEWORDS = "[filewords]"

_FILEWORDS_WITH_COMMA_BEFORE = re.compile(r"\s*,\s*\[filewords\]")
_FILEWORDS_WITH_COMMA_AFTER = re.compile(r"\[filewords\]\s*,\s*")


@dataclass(frozen=True)
class PromptTemplate:
    """The prompt lines of one template."""

    name: str  # built-in name, or the file's path
    lines: tuple[str, ...]

    @property
    def uses_filewords(self) -> bool:
        """Whether any line includes the caption."""
        return any(FILEWORDS in line for line in self.lines)


def builtin_templates() -> list[str]:
    """Names of the templates shipped with the extension."""
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.txt"))


def load_template(template: str | Path) -> PromptTemplate:
    """A built-in template by name, or a user's template file by path."""
    if isinstance(template, str) and template in builtin_templates():
        path = TEMPLATE_DIR / f"{template}.txt"
        name = template
    else:
        path = Path(template)
        name = str(path)
        if not path.is_file():
            raise TemplateError(
                f"Prompt template {template!s} is neither a built-in template "
                f"({', '.join(builtin_templates())}) nor an existing text file."
            )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise TemplateError(f"Cannot read the prompt template {path}: {error}. Save it as UTF-8 text.") from error
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise TemplateError(
            f"The prompt template {path} is empty. Write one prompt per line, using [name] for the "
            "trained name and [filewords] for the caption, e.g. 'a photo of a [name], [filewords]'."
        )
    return PromptTemplate(name, lines)


def fill_template(line: str, name: str, filewords: str) -> str:
    """`line` with `[name]` and `[filewords]` replaced; an empty caption takes its comma with it."""
    if not filewords:
        line = _FILEWORDS_WITH_COMMA_BEFORE.sub("", line)
        line = _FILEWORDS_WITH_COMMA_AFTER.sub("", line)
        line = " ".join(line.replace(FILEWORDS, "").split())
    return line.replace(NAME, name).replace(FILEWORDS, filewords)
