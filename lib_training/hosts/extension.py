"""What `scripts/sd_webui_training.py` registers with the WebUI, and the one `TrainingService`.

The WebUI re-imports the script on "Reload UI" but not this package, so the service (and a job it
may be running) lives here, once per process.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from lib_training.app.jobs import JobManager
from lib_training.app.service import TrainingService
from lib_training.app.terminal_log import log_to_terminal
from lib_training.hosts import settings
from lib_training.hosts.detect import host_kind
from lib_training.hosts.exclusive import run_exclusive
from lib_training.hosts.workspace import HostAdapter, WebUIWorkspace

_service: TrainingService | None = None
_lock = threading.Lock()
_apps: weakref.WeakSet[Any] = weakref.WeakSet()  # the WebUI's FastAPI apps (a new one after each UI reload)


def make_host() -> HostAdapter:
    """The adapter for the WebUI we run in."""
    if host_kind() == "forge":
        from lib_training.hosts.forge import ForgeHost

        return ForgeHost()
    from lib_training.hosts.a1111 import A1111Host

    return A1111Host()


def service() -> TrainingService:
    """The extension's service: jobs hold the WebUI's queue lock and train its loaded model. Their
    start, end and failure (with the traceback of a bug) are logged in the WebUI's terminal."""
    global _service
    with _lock:
        if _service is None:
            log_to_terminal()
            _service = TrainingService(WebUIWorkspace(make_host()), JobManager(run_exclusive=run_exclusive))
        return _service


def ui_tabs() -> list[tuple[Any, str, str]]:
    """`on_ui_tabs`: the Training and Merge tabs."""
    from lib_training.app.ui.merge_tab import build_merge_tab
    from lib_training.app.ui.training_tab import build_training_tab

    return [
        (build_training_tab(service()), "Training", "sd_webui_training"),
        (build_merge_tab(service()), "Merge", "sd_webui_training_merge"),
    ]


def ui_settings() -> None:
    """`on_ui_settings`: the extension's settings section."""
    settings.register()


def app_started(demo: Any, app: Any) -> None:
    """`on_app_started`: our HTTP API on the WebUI's FastAPI app (also with --nowebui, where `demo` is None).
    After a UI reload the WebUI passes a new app, which gets the routes again."""
    from lib_training.app.api import build_router

    app.include_router(build_router(service()))
    _apps.add(app)


def started_apps() -> list[Any]:
    """The WebUI's FastAPI apps `app_started` was called with that are still alive."""
    return list(_apps)


def script_unloaded() -> None:
    """`on_script_unloaded`: nothing to undo. The extension patches nothing outside a job, and a job
    that runs keeps running (and keeps the queue lock) through a UI reload; it cleans up after itself."""
