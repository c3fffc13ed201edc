"""The adapters import without a WebUI, and the stand-in WebUIs leave nothing behind."""

from __future__ import annotations

import importlib
import pkgutil
import sys

from webui_support import STANDIN_PACKAGES, installed

import lib_training.hosts


def test_every_adapter_module_imports_without_a_webui() -> None:
    for info in pkgutil.iter_modules(lib_training.hosts.__path__):
        importlib.import_module(f"lib_training.hosts.{info.name}")
    assert not STANDIN_PACKAGES & {name.split(".")[0] for name in sys.modules}


def test_the_stand_in_webui_is_gone_after_its_test(tmp_path) -> None:
    path = list(sys.path)
    with installed("forge", tmp_path) as webui:
        webui.module("backend.memory_management")
        assert "modules.shared" in sys.modules
    assert sys.path == path
    assert not STANDIN_PACKAGES & {name.split(".")[0] for name in sys.modules}
