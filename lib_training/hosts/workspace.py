"""The `Workspace` of a WebUI: its loaded model, its folders, and results usable at once.

Results go to the host's own folders (embeddings into its embeddings folder, where it loads them
from); run logs go to `LOG_DIR/DATE/NAME/` (see `settings`), outside every folder the host scans,
so numbered copies never show up as embeddings.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from lib_training.app.service import Workspace
from lib_training.errors import UserError
from lib_training.hosts import settings
from lib_training.methods import registered
from lib_training.model.diffusion import DiffusionModel
from lib_training.training.method import MethodSpec
from lib_training.training.outputs import RunFolder


class HostAdapter(Protocol):
    name: str

    def session(self, verify: bool = False, use_sdpa: bool = True) -> contextlib.AbstractContextManager[Any]: ...

    def publish(self, role: str, result: Path) -> None:
        """Make a new result usable at once: `role` is where it went ("embeddings", "loras", ...)."""
        ...

    def refresh_checkpoints(self) -> None: ...


class WebUIWorkspace(Workspace):
    def __init__(self, host: HostAdapter, today: Any = datetime.date.today) -> None:
        self.host = host
        self._today = today
        self._model: DiffusionModel | None = None

    # --- the model ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The host's model prepared for training while inside, restored on exit."""
        verify = bool(settings.value(settings.VERIFY_MODEL))
        use_sdpa = bool(settings.value(settings.SDPA_ATTENTION))
        with self.host.session(verify=verify, use_sdpa=use_sdpa) as model:
            self._model = model
            try:
                yield
            finally:
                self._model = None

    def model(self) -> DiffusionModel:
        if self._model is None:
            raise UserError("the WebUI's model is only available to a running job")
        return self._model

    def describe_model(self) -> str:
        from modules import shared

        title = getattr(shared.opts, "data", {}).get("sd_model_checkpoint")
        return f"{self.host.name}: {title}" if title else f"the model loaded in {self.host.name}"

    def model_identity(self) -> dict[str, str]:
        """The loaded checkpoint's short hash and name, as the WebUI's own textual inversion records them."""
        from modules import shared

        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        identity = {}
        if getattr(info, "shorthash", None):
            identity["sd_checkpoint"] = str(info.shorthash)
        if getattr(info, "model_name", None):
            identity["sd_checkpoint_name"] = str(info.model_name)
        return identity

    # --- folders --------------------------------------------------------------------------------
    def run_folder(self, spec: MethodSpec, name: str) -> Path:
        """LOG_DIR/DATE/NAME.KIND (the method may choose another suffix: embeddings use none). A run of
        that name with a saved state on an earlier day is continued there, unless today's folder exists."""
        leaf = spec.run_folder_name(name)
        root = settings.folder(settings.LOG_DIR)
        today = root / self._today().isoformat() / leaf
        if today.exists():
            return today
        earlier = sorted(root.glob(f"*/{_glob_escape(leaf)}/{RunFolder.RESUME_NAME}"), reverse=True)
        return earlier[0].parent if earlier else today

    def runs_root(self, spec: MethodSpec) -> Path:
        """LOG_DIR: run folders are LOG_DIR/DATE/NAME, so earlier days' runs are found too."""
        return settings.folder(settings.LOG_DIR)

    def result_dir(self, spec: MethodSpec) -> Path | None:
        return settings.folder(settings.RESULT_DIRS[spec.result_role])

    def result_folders(self) -> dict[str, Path]:
        return {kind: self.result_dir(spec) for kind, spec in registered().items()}

    def after_training(self, spec: MethodSpec, result: Path) -> None:
        self.host.publish(spec.result_role, result)

    # --- for the Merge tab --------------------------------------------------------------------------
    def model_folders(self) -> dict[str, list[Path]]:
        """The host's checkpoint, LoRA and VAE folders (`--ckpt-dir`/`--vae-dir` first when given)."""
        from modules import paths, shared

        cmd = shared.cmd_opts
        models = Path(paths.models_path)

        def folders(option: str, default: Path) -> list[Path]:
            given = getattr(cmd, option, None)
            return [Path(given), default] if given else [default]

        return {
            "checkpoints": folders("ckpt_dir", models / "Stable-diffusion"),
            "loras": [settings.folder(settings.LORA_DIR)],
            "vaes": folders("vae_dir", models / "VAE"),
        }

    def aesthetic_folders(self) -> list[Path]:
        """`models/aesthetic_embeddings` (new embeddings go there), then the aesthetic-gradients
        extension's own folder, so that its embeddings are found where people have them."""
        from modules import paths

        extension = Path(paths.script_path) / "extensions" / "stable-diffusion-webui-aesthetic-gradients"
        return [Path(paths.models_path) / "aesthetic_embeddings", extension / "aesthetic_embeddings"]

    def after_merge(self, kind: str, result: Path) -> None:
        """`kind` is the model folder's role: a checkpoint list to rescan, or a result role to publish."""
        if kind == "checkpoints":
            self.host.refresh_checkpoints()
        else:
            self.host.publish(kind, result)


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
