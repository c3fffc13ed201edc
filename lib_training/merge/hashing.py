"""Hashing a merge's input files on a background thread while the merge runs."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from lib_training.formats.file_hashes import file_sha256
from lib_training.merge.progress import CancelToken, is_cancelled


class HashJob:
    """sha256 of several files, computed on a background thread; `result()` waits for them."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]], cancel: CancelToken = None) -> None:
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self._stop = threading.Event()
        self._cancel = cancel
        self._results: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _stopped(self) -> bool:
        return self._stop.is_set() or is_cancelled(self._cancel)

    def _run(self) -> None:
        try:
            for path in self.paths:
                value = file_sha256(path, self._stopped)
                if value is None:
                    return
                self._results[path] = value
        except BaseException as error:  # handed to the caller of result()
            self._error = error

    def result(self) -> Mapping[Path, str]:
        """Path -> hex sha256 of every file; raises what hashing raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._results)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
