"""The jobs' log in the terminal of the process that serves them: the standalone server's, or the
WebUI's (A1111 and Forge print their own progress there too).

`lib_training.app.jobs` logs each job's start, its end and its failure (a bug with its traceback);
`log_to_terminal` shows those lines on stderr, once however often it is called.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER = "lib_training"
FORMAT = "%(asctime)s sd-webui-training: %(message)s"


class TerminalHandler(logging.StreamHandler):
    """A handler writing to the `sys.stderr` of the moment: a WebUI (or a test) may replace it after
    the handler was made, and a stream kept from then would write into the void."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always the current sys.stderr


def log_to_terminal() -> None:
    """Show the jobs' log (started, ended, failed with the traceback of a bug) on stderr.

    The lines do not also go on to the root logger: a host that configured one (A1111 with
    SD_WEBUI_LOG_LEVEL) would print each twice."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(handler, TerminalHandler) for handler in logger.handlers):
        logger.addHandler(TerminalHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
