"""Which WebUI we run in."""

from __future__ import annotations

import importlib.util
import sys
from typing import Literal

HostKind = Literal["a1111", "forge"]


def _present(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def host_kind() -> HostKind:
    """ "forge" when Forge's own packages are importable, else "a1111" (AUTOMATIC1111 and its forks)."""
    return "forge" if _present("modules_forge") and _present("backend") else "a1111"
