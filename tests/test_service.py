"""The training service over the standalone workspace: what files record about the model."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from lib_training.app.service import StandaloneWorkspace, TrainingService
from lib_training.formats.file_hashes import file_sha256


def test_standalone_identity_is_the_checkpoint_name_and_its_hash_once_known(tiny_checkpoints, tmp_path) -> None:
    copy = tmp_path / "my-model.safetensors"
    copy.write_bytes(tiny_checkpoints["sd1"].read_bytes())
    workspace = StandaloneWorkspace(copy, tmp_path / "out")
    assert workspace.model_identity() == {"sd_checkpoint_name": "my-model"}  # the hash is not computed here
    digest = file_sha256(copy)
    assert workspace.model_identity() == {"sd_checkpoint_name": "my-model", "sd_checkpoint": digest[:10]}


def test_a_trained_pt_embedding_names_the_model_it_was_trained_on(tiny_checkpoints, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(images / "red.png")
    service = TrainingService(StandaloneWorkspace(tiny_checkpoints["sd1"], tmp_path / "out", device="cpu"))
    body = {
        "method": {"name": "named", "file_format": "pt"},
        "data": {"path": str(images), "size": 64, "template": "subject"},
        "loop": {"steps": 1, "save_every": 0, "preview_every": 0},
    }
    job = service.jobs.wait(service.start_training("embedding", body).id, 120)
    assert job.state == "finished", job.error
    saved = torch.load(job.result["result"], weights_only=True)
    assert saved["sd_checkpoint_name"] == tiny_checkpoints["sd1"].stem
