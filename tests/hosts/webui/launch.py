"""Stand-in for the WebUI's `launch` module as `install.py` sees it (`launch_utils` helpers)."""

import importlib.metadata
import importlib.util

missing: set[str] = set()  # names a test pretends are not installed
pip_calls: list[tuple[str, str | None]] = []


def is_installed(package):
    """As the host's: a distribution of that name, or else an importable module of that name."""
    if package in missing:
        return False
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        try:
            return importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:
            return False


def run_pip(command, desc=None, live=False):
    pip_calls.append((command, desc))
