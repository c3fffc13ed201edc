"""Hypernetwork training inside both WebUI shapes: the result is A1111's .pt in the host's hypernetworks
folder, the host's list is refreshed, the file loads back for the host's model, and the model is exactly
as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from webui_support import finish

from lib_training.formats.hypernetwork_file import optim_path, read_hypernetwork
from lib_training.hosts import extension, settings


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_a_hypernetwork_trains_publishes_and_leaves_the_model_as_it_was(kind, request, standalone, red_ball) -> None:
    webui = request.getfixturevalue(kind)
    webui.load(standalone["sd1"])
    before = webui.snapshot()
    reloads = webui.shared.hypernetwork_reloads
    body = {
        "method": {"name": "hx", "activation": "relu", "layer_norm": True},
        "data": {"path": str(red_ball), "size": 64, "template": "filewords"},
        "loop": {"steps": 3, "save_every": 0, "preview_every": 2, "preview_steps": 2},
    }
    job = finish(extension.service().start_training("hypernetwork", body))
    assert job.state == "finished", job.error
    result = Path(job.result["result"])
    assert result == settings.folder(settings.HYPERNETWORKS_DIR) / "hx.pt"
    saved = read_hypernetwork(result)
    assert saved.step == 3 and list(saved.layers) == [128, 32, 64] and saved.activation_func == "relu"
    assert optim_path(result).is_file()
    assert webui.shared.hypernetwork_reloads == reloads + 1
    assert "hx" in webui.shared.hypernetworks
    assert webui.snapshot() == before


def test_create_writes_into_the_hosts_hypernetworks_folder_and_refreshes_its_list(webui) -> None:
    reloads = webui.shared.hypernetwork_reloads
    path = extension.service().create("hypernetwork", {"name": "fresh", "widths": "768, 320"})
    assert path == settings.folder(settings.HYPERNETWORKS_DIR) / "fresh.pt"
    assert list(read_hypernetwork(path).layers) == [768, 320]
    assert webui.shared.hypernetwork_reloads == reloads + 1 and "fresh" in webui.shared.hypernetworks
