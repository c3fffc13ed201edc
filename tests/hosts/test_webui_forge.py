"""Forge specifics: its pitfalls are real in the stand-in (inference tensors, in-place adds, no
checkpointing), LoRAs it merged, its memory manager's order, and results reloaded in every text
engine, the cards and its HTTP API."""

from __future__ import annotations

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from webui_support import finish, training_body

from lib_training.hosts import extension
from lib_training.hosts.snapshots import trainable_parameters


def _unet_backward(dm) -> None:
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, 128, requires_grad=True)
    dm(x, torch.tensor([10]), context=context, transformer_options={}).square().mean().backward()


def test_the_stand_in_has_forges_training_pitfalls(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    dm = engine.forge_objects_original.unet.model.diffusion_model
    with pytest.raises(RuntimeError, match="Inference tensors"):
        _unet_backward(dm)
    with trainable_parameters([dm]), pytest.raises(RuntimeError, match="inplace"):
        _unet_backward(dm)
    with pytest.raises(NotImplementedError):
        forge.module("backend.nn.unet").checkpoint(lambda: None, (), None, True)


def test_inside_a_session_the_unet_trains_and_afterwards_it_is_forges_again(forge, standalone) -> None:
    engine = forge.load(standalone["sd1"])
    dm = engine.forge_objects_original.unet.model.diffusion_model
    before = forge.snapshot()
    with extension.make_host().session():
        _unet_backward(dm)
    assert forge.snapshot() == before
    assert all(p.is_inference() for p in dm.parameters())


def test_a_loaded_lora_is_unmerged_for_training_and_merged_again(forge, standalone, red_ball) -> None:
    engine = forge.load(standalone["sd1"])
    memory = forge.module("backend.memory_management")
    objects = engine.forge_objects_original
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    layer = objects.unet.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    base = layer.weight.clone()
    with_lora = objects.unet.clone()
    with_lora.add_patches(filename="style.safetensors", patches={key: torch.full(base.shape, 0.5)})
    engine.forge_objects_after_applying_lora.unet = with_lora
    memory.load_models_gpu([with_lora, objects.clip.patcher])  # a generation with <lora:style:1>
    merged = layer.weight.clone()
    assert not torch.equal(merged, base)
    before = forge.snapshot()
    loaded = [loaded.model for loaded in memory.current_loaded_models]

    with extension.make_host().session():
        assert torch.equal(layer.weight, base)
    assert torch.equal(layer.weight, merged)
    assert [loaded.model for loaded in memory.current_loaded_models] == loaded

    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=3)))
    assert job.state == "finished", job.error
    after = forge.snapshot()
    assert after.pop("parameters") != before.pop("parameters")  # Forge merges into new Parameter objects
    assert after == before
    assert any(loaded.model is with_lora for loaded in memory.current_loaded_models)


def _after_a_generation(forge, standalone):
    """Forge with tiny SD1 loaded and used once (sampling, then decoding): its memory manager, the
    engine's original objects and the models it holds, in order."""
    engine = forge.load(standalone["sd1"])
    memory = forge.module("backend.memory_management")
    objects = engine.forge_objects_original
    memory.load_models_gpu([objects.unet, objects.clip.patcher])
    memory.load_models_gpu([objects.vae.patcher])
    return memory, objects, [loaded.model for loaded in memory.current_loaded_models]


def test_forges_memory_manager_has_the_loaded_models_in_their_order_of_before(forge, standalone, red_ball) -> None:
    """Forge unloads from the back of `current_loaded_models` when it needs memory, so the order matters."""
    memory, _, before = _after_a_generation(forge, standalone)

    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=2)))

    assert job.state == "finished", job.error
    assert [loaded.model for loaded in memory.current_loaded_models] == before


def test_the_embedding_reloads_in_every_text_engine_and_in_the_cards(forge, standalone, red_ball) -> None:
    engine = forge.load(standalone["sdxl"])
    cards = forge.module("modules.ui_extra_networks_textual_inversion").embedding_db  # imported by Forge's UI
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=2)))
    assert job.state == "finished", job.error
    for text_engine in (engine.text_processing_engine_l, engine.text_processing_engine_g):
        assert "zqx" in text_engine.embeddings.word_embeddings
    assert "zqx" in cards.word_embeddings


def test_the_embedding_is_listed_by_forges_http_api_without_a_refresh(forge, standalone, red_ball) -> None:
    forge.load(standalone["sd1"])
    app = FastAPI()
    forge.module("modules.api.api").Api(app, forge.module("modules.call_queue").queue_lock)  # --api
    extension.app_started(None, app)  # Forge calls the extensions' app_started after creating its API
    client = TestClient(app)
    assert client.get("/sdapi/v1/embeddings").json()["loaded"] == {}

    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=2)))

    assert job.state == "finished", job.error
    assert "zqx" in client.get("/sdapi/v1/embeddings").json()["loaded"]


def test_with_cached_text_outputs_forge_unloads_the_text_encoders_for_the_steps(
    forge, standalone, red_ball, monkeypatch
) -> None:
    memory, objects, before = _after_a_generation(forge, standalone)
    memory.load_calls.clear()
    held: list[list] = []  # what Forge held at each load call
    load = memory.load_models_gpu
    monkeypatch.setattr(
        memory,
        "load_models_gpu",
        lambda models: held.append([m.model for m in memory.current_loaded_models]) or load(models),
    )
    body = {
        "method": {"name": "zqx", "rank": 4},
        "data": {"path": str(red_ball), "size": 64, "template": "subject"},
        "loop": {"steps": 3, "save_every": 0, "preview_every": 0, "cache_text_outputs": True},
    }

    job = finish(extension.service().start_training("lora", body))

    assert job.state == "finished", job.error
    calls = memory.load_calls
    first = calls.index([objects.unet])  # the first step: only the UNet is asked for
    assert sum(call == [objects.unet] for call in calls) >= 3
    assert not any(objects.clip.patcher in call for call in calls[first:-1])  # until the job loads it again
    assert objects.clip.patcher not in held[first]  # unloaded, not just not asked for
    assert objects.vae.patcher not in held[first]  # latents are cached: the VAE is unloaded for the steps too
    assert [loaded.model for loaded in memory.current_loaded_models] == before
