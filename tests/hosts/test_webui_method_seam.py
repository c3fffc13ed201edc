"""A method registered only in the tests trains in both WebUI shapes: its result goes to the folder
of its result role, the host's list for that role is refreshed (published), and the WebUI's model
is exactly as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import throwaway_method
from webui_support import finish

from lib_training.hosts import extension, settings
from lib_training.methods import registered_for


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_a_registered_method_trains_publishes_and_leaves_the_model_as_it_was(
    kind, request, standalone, red_ball
) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone["sd1"])
    networks = webui.module("networks")
    listed = networks.list_calls
    before = webui.snapshot()
    body = {
        "method": {"name": "xb", "init_scale": 0.1},
        "data": {"path": str(red_ball), "size": 64, "template": "subject"},
        "loop": {"steps": 3, "save_every": 0, "preview_every": 2},
    }

    with registered_for(throwaway_method.SPEC):
        job = finish(extension.service().start_training("xbias", body))

    assert job.state == "finished", job.error
    assert Path(job.result["result"]) == settings.folder(settings.LORA_DIR) / "xb.safetensors"
    assert Path(job.result["result"]).is_file()
    assert networks.list_calls == listed + 1  # the host's Lora list was refreshed
    assert Path(job.result["folder"]).name == "xb.xbias"  # its run log, outside the Lora folder
    assert webui.snapshot() == before
