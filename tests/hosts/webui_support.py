"""Helpers of the WebUI tests: a stand-in AUTOMATIC1111 or Forge on `sys.path` (see webui/README.md),
fingerprints of its model, request bodies, waiting for jobs, the evaluation loss."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib_training.app import terminal_log
from lib_training.formats.fingerprint import hooks_snapshot, requires_grad_snapshot, weights_fingerprint

HERE = Path(__file__).parent
WEBUI, FORGE = HERE / "webui", HERE / "forge"
STANDIN_PACKAGES = {"modules", "ldm", "sgm", "launch", "networks", "standin_models", "modules_forge", "backend"}
# Stand-in packages kept in folders named `standin_<package>` (so that no one mistakes them for a
# host's code) and imported under the host's package name.
RENAMED = {"a1111": {"ldm": WEBUI / "standin_ldm", "sgm": WEBUI / "standin_sgm"}}
RENAMED["forge"] = {
    **RENAMED["a1111"],
    "backend": FORGE / "standin_backend",
    "modules_forge": FORGE / "standin_modules_forge",
}

A1111_SHAPES = ("sd1", "sd2", "sdxl")
FORGE_SHAPES = ("sd1", "sd2", "sdxl")


@dataclass
class WebUI:
    """A stand-in WebUI installed on sys.path; `kind` is "a1111" or "forge"."""

    kind: str
    data: Path

    def module(self, name: str) -> Any:
        return importlib.import_module(name)

    @property
    def shared(self) -> Any:
        return self.module("modules.shared")

    @property
    def state(self) -> Any:
        return self.shared.state

    def load(self, standalone, **options: Any) -> Any:
        """Load a model into the WebUI (`shared.sd_model`), built from a standalone model's weights."""
        builders = self.module("standin_models")
        return (builders.build_forge if self.kind == "forge" else builders.build_a1111)(standalone, **options)

    def host_modules(self) -> dict[str, torch.nn.Module]:
        """Every host module whose weights, hooks and flags must survive a job."""
        sd_model = self.shared.sd_model
        if self.kind == "a1111":
            return {"sd_model": sd_model}
        objects = sd_model.forge_objects_original
        return {
            "kmodel": objects.unet.model,
            "text": objects.clip.cond_stage_model,
            "vae": objects.vae.first_stage_model,
        }

    def snapshot(self) -> dict[str, Any]:
        """What must be exactly as before after a job: weights, hooks, requires_grad flags, the
        parameter objects themselves (and their inference-ness), patched class attributes,
        selected hypernetworks and LoRAs, the host's queue and progress state."""
        modules = self.host_modules()
        params = [p for m in modules.values() for p in m.parameters()]
        shot: dict[str, Any] = {
            "weights": weights_fingerprint(modules),
            "hooks": hooks_snapshot(modules),
            "requires_grad": requires_grad_snapshot(modules),
            "parameters": [id(p) for p in params],
            "inference": [p.is_inference() for p in params],
            "training": [m.training for root in modules.values() for m in root.modules()],
            "hypernetworks": list(self.shared.loaded_hypernetworks),
            "lock_free": not self.module("modules.call_queue").queue_lock.locked(),
            "state": {k: v for k, v in self.state.dict().items() if k not in ("job_no", "sampling_step")},
        }
        if self.kind == "a1111":
            attention = [self.module(f"{p}.modules.attention").CrossAttention for p in ("ldm", "sgm")]
            vae = [self.module(f"{p}.modules.diffusionmodules.model") for p in ("ldm", "sgm")]
            unet = [self.module(f"{p}.modules.diffusionmodules.openaimodel") for p in ("ldm", "sgm")]
            shot["patched"] = [
                *(vars(c).get("forward") for c in attention),
                *(vars(m.AttnBlock).get("forward") for m in vae),
                *(m.nonlinearity for m in vae),
                *(m.th for m in unet),
            ]
            networks = sys.modules.get("networks")
            shot["loras"] = list(networks.loaded_networks) if networks else None
        return shot


@contextlib.contextmanager
def installed(kind: str, data: Path) -> Iterator[WebUI]:
    """Put the stand-in WebUI on sys.path, point its folders into `data`; remove every trace after."""
    from lib_training.hosts import extension

    saved_path = list(sys.path)
    sys.path[:0] = [str(WEBUI)]
    finder = _RenamedPackages(RENAMED[kind])
    sys.meta_path.insert(0, finder)
    try:
        paths = importlib.import_module("modules.paths")
        paths.script_path = paths.data_path = str(data)
        paths.models_path = str(data / "models")
        webui = WebUI(kind, data)
        webui.shared  # noqa: B018  (imports shared with those folders)
        yield webui
    finally:
        sys.path[:] = saved_path
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in STANDIN_PACKAGES]:
            del sys.modules[name]
        extension._service = None
        _stop_terminal_log()


def _stop_terminal_log() -> None:
    """Undo `log_to_terminal` (which the extension's service calls once per WebUI process), so that
    the next tests see the jobs' log records on the root logger again."""
    logger = logging.getLogger(terminal_log.LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, terminal_log.TerminalHandler)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


class _RenamedPackages(importlib.abc.MetaPathFinder):
    """Finds the top-level packages in `folders` (name -> folder); their submodules are then found
    through the package's `__path__` as usual."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        folder = self.folders.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def training_body(images: Path, name: str = "zqx", steps: int = 10, **loop: Any) -> dict[str, Any]:
    """A textual-inversion request body for the tiny models."""
    return {
        "method": {"name": name, "init_text": "ball", "vectors": 2},
        "data": {"path": str(images), "size": 64, "template": "subject"},
        "loop": {"steps": steps, "save_every": 0, "preview_every": 0, "latent_sampling": "mean", **loop},
    }


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def finish(job, timeout: float = 120.0):
    """Wait for a job to end; return it."""
    assert job.done_event.wait(timeout), f"job {job.title} still running after {timeout} s"
    return job
