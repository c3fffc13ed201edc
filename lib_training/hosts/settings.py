"""The extension's section in the WebUI's Settings, and the folders and switches read from it.

Result folders default to the host's own (`--embeddings-dir`, `--hypernetwork-dir`, `--lora-dir`),
so results load there at once. Run logs (previews, loss, settings, numbered copies, resume state)
go to a log folder the host does not scan, as A1111's own trainer does: `textual_inversion/` in the
WebUI's data folder, one `DATE/NAME/` folder per run. An empty setting means its default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SECTION = ("sd_webui_training", "Training (sd-webui-training)")

EMBEDDINGS_DIR = "sd_webui_training_embeddings_dir"
HYPERNETWORKS_DIR = "sd_webui_training_hypernetworks_dir"
LORA_DIR = "sd_webui_training_lora_dir"
LOG_DIR = "sd_webui_training_log_dir"
SDPA_ATTENTION = "sd_webui_training_sdpa_attention"
VERIFY_MODEL = "sd_webui_training_verify_model"

# A method's results go to the folder of its result role (`MethodSpec.result_role`).
RESULT_DIRS = {"embeddings": EMBEDDINGS_DIR, "hypernetworks": HYPERNETWORKS_DIR, "loras": LORA_DIR}


def _cmd_opts() -> Any:
    from modules import shared

    return shared.cmd_opts


def _paths() -> Any:
    from modules import paths

    return paths


def default_value(key: str) -> Any:
    """A setting's default, from the WebUI's command line and folders."""
    cmd = _cmd_opts()
    paths = _paths()
    models = Path(getattr(paths, "models_path", "models"))
    folders = {
        EMBEDDINGS_DIR: getattr(cmd, "embeddings_dir", None) or Path(paths.data_path) / "embeddings",
        HYPERNETWORKS_DIR: getattr(cmd, "hypernetwork_dir", None) or models / "hypernetworks",
        LORA_DIR: getattr(cmd, "lora_dir", None) or models / "Lora",
        LOG_DIR: Path(paths.data_path) / "textual_inversion",
    }
    if key in folders:
        return str(folders[key])
    return {SDPA_ATTENTION: True, VERIFY_MODEL: False}[key]


_LABELS = {
    EMBEDDINGS_DIR: "Folder for trained embeddings (empty: the WebUI's embeddings folder, where they load from)",
    HYPERNETWORKS_DIR: "Folder for trained hypernetworks (empty: the WebUI's hypernetworks folder)",
    LORA_DIR: "Folder for trained LoRAs (empty: the WebUI's Lora folder)",
    LOG_DIR: "Folder for training logs: previews, loss, settings, numbered copies, resume state (empty: "
    "textual_inversion in the WebUI's folder)",
    SDPA_ATTENTION: "A1111: train with PyTorch's memory-efficient attention (instead of the WebUI's unoptimised "
    "attention when 'Use cross attention optimizations while training' is off)",
    VERIFY_MODEL: "Check after every job that the WebUI's model is exactly as before (reads every weight; slower)",
}


def register() -> None:
    """Add the section to the WebUI's settings (called from `on_ui_settings`)."""
    from modules import shared

    for key, label in _LABELS.items():
        default = default_value(key)
        shared.opts.add_option(
            key, shared.OptionInfo("" if isinstance(default, str) else default, label, section=SECTION)
        )


def value(key: str) -> Any:
    """The setting's value, or its default when empty or not registered (e.g. with --nowebui)."""
    from modules import shared

    current = getattr(shared.opts, "data", {}).get(key)
    if current is None or current == "":
        return default_value(key)
    return current


def folder(key: str) -> Path:
    return Path(os.path.expanduser(str(value(key))))
