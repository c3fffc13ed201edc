"""The per-user cache folder (demo assets, file hashes): `$SDWT_CACHE`, or `~/.cache/sd-webui-training`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    configured = os.environ.get("SDWT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "sd-webui-training"
