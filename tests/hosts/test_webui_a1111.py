"""AUTOMATIC1111 specifics: --lowvram refused, --medvram, merged LoRAs, attention optimisations,
hypernetworks, replacement UNets, failures while preparing, where results and logs go."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
from webui_support import finish, training_body

from lib_training.hosts import extension, settings
from lib_training.hosts.a1111 import LOWVRAM_MESSAGE, sdpa_attention_forward
from lib_training.model.prompt import tokenize


def test_lowvram_is_refused_with_a_clear_message(a1111, standalone, red_ball) -> None:
    a1111.load(standalone["sd1"])
    a1111.shared.cmd_opts.lowvram = True
    before = a1111.snapshot()
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=2)))
    assert job.state == "failed"
    assert job.error == LOWVRAM_MESSAGE
    assert a1111.snapshot() == before


def test_medvram_trains_without_the_webui_moving_modules_and_restores_its_tracking(a1111, standalone, red_ball) -> None:
    sd_model = a1111.load(standalone["sd1"], medvram=True)
    lowvram = a1111.module("modules.lowvram")
    lowvram.module_in_gpu = sd_model.first_stage_model  # the VAE was the last module the WebUI used
    before = a1111.snapshot()
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=3)))
    assert job.state == "finished", job.error
    assert lowvram.hook_calls == []  # no module was called through the WebUI's moving hooks
    assert lowvram.module_in_gpu is sd_model.first_stage_model
    assert a1111.snapshot() == before


def _first_weight(layer: torch.nn.Module) -> torch.Tensor:
    return layer.in_proj_weight if isinstance(layer, torch.nn.MultiheadAttention) else layer.weight


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_merged_lora_is_taken_out_for_training_and_merged_back(a1111, standalone, red_ball, arch) -> None:
    sd_model = a1111.load(standalone[arch])
    networks = a1111.module("networks")
    networks.assign_network_names(sd_model)  # names every submodule, containers included
    unet_layer = sd_model.model.diffusion_model.middle_block[1].transformer_blocks[0].attn2.to_k
    if arch == "sd1":
        text_layer = sd_model.cond_stage_model.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
    else:
        text_layer = sd_model.conditioner.embedders[1].wrapped.model.transformer.resblocks[0].attn
        assert isinstance(text_layer, torch.nn.MultiheadAttention)
    layers = [unet_layer, text_layer]
    base = [_first_weight(layer).detach().clone() for layer in layers]
    style = networks.Network(
        "style", {layer.network_layer_name: torch.full_like(w, 0.5) for layer, w in zip(layers, base)}
    )
    networks.generate(sd_model, [style])  # a generation with <lora:style:1> merged it
    before = a1111.snapshot()
    merged = [_first_weight(layer).detach().clone() for layer in layers]
    assert not any(torch.equal(m, b) for m, b in zip(merged, base))

    with extension.make_host().session():
        assert all(torch.equal(_first_weight(layer), b) for layer, b in zip(layers, base))
        assert networks.loaded_networks == []
    assert all(torch.equal(_first_weight(layer), m) for layer, m in zip(layers, merged))
    assert networks.loaded_networks == [style]

    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=3)))
    assert job.state == "finished", job.error
    assert a1111.snapshot() == before


def test_attention_is_unoptimised_for_training_and_the_same_functions_come_back(a1111, standalone) -> None:
    a1111.load(standalone["sd1"])
    ldm_attention = a1111.module("ldm.modules.attention")
    hypernetwork = a1111.module("modules.hypernetworks.hypernetwork")
    before = a1111.snapshot()
    with extension.make_host().session(use_sdpa=True):
        assert ldm_attention.CrossAttention.forward is sdpa_attention_forward
    with extension.make_host().session(use_sdpa=False):
        assert ldm_attention.CrossAttention.forward is hypernetwork.attention_CrossAttention_forward
    assert a1111.snapshot() == before


def test_the_stand_in_optimisation_cannot_train_so_undoing_it_matters(a1111, standalone, red_ball) -> None:
    """With "Use cross attention optimizations while training" on, the WebUI's optimisation stays; the
    stand-in's computes without gradients, as optimisations that broke A1111's trainer did."""
    a1111.load(standalone["sd1"])
    a1111.shared.opts.training_xattention_optimizations = True
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=2)))
    assert job.state == "failed"
    assert "does not require grad" in job.error


def test_loaded_hypernetworks_are_not_applied_while_training_and_stay_loaded(a1111, standalone, red_ball) -> None:
    a1111.load(standalone["sd1"])
    hypernetwork = a1111.module("modules.hypernetworks.hypernetwork").Hypernetwork("anime")
    a1111.shared.loaded_hypernetworks.append(hypernetwork)
    a1111.shared.opts.data[settings.SDPA_ATTENTION] = False  # the WebUI's own attention, which applies them
    before = a1111.snapshot()
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=3)))
    assert job.state == "finished", job.error
    assert hypernetwork.calls == 0
    assert a1111.snapshot() == before
    assert a1111.shared.loaded_hypernetworks == [hypernetwork]


def test_a_replacement_unet_is_refused(a1111, standalone, red_ball) -> None:
    a1111.load(standalone["sd1"])
    option = type("Option", (), {"label": "TensorRT: tiny"})()
    a1111.module("modules.sd_unet").current_unet = type("Unet", (), {"option": option})()
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=2)))
    assert job.state == "failed"
    assert "TensorRT: tiny" in job.error and "'None'" in job.error


def test_a_failure_while_preparing_undoes_the_steps_already_taken(a1111, standalone, red_ball, monkeypatch) -> None:
    sd_model = a1111.load(standalone["sd1"])
    networks = a1111.module("networks")
    networks.assign_network_names(sd_model)
    a1111.shared.loaded_hypernetworks.append(a1111.module("modules.hypernetworks.hypernetwork").Hypernetwork("h"))
    before = a1111.snapshot()

    def broken():
        raise RuntimeError("undo_optimizations failed")

    monkeypatch.setattr(a1111.module("modules.sd_hijack"), "undo_optimizations", broken)
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=2)))
    assert job.state == "failed"
    assert "undo_optimizations failed" in job.error
    assert a1111.snapshot() == before


def test_the_embedding_loads_in_the_webui_at_once_and_the_logs_stay_out_of_its_folders(
    a1111, standalone, red_ball
) -> None:
    a1111.load(standalone["sd1"])
    db = a1111.module("modules.sd_hijack").model_hijack.embedding_db
    job = finish(extension.service().start_training("embedding", training_body(red_ball, steps=4, save_every=2)))
    assert job.state == "finished", job.error

    embeddings = Path(a1111.shared.cmd_opts.embeddings_dir)
    assert Path(job.result["result"]) == embeddings / "zqx.safetensors"
    assert db.word_embeddings == {"zqx": str(embeddings / "zqx.safetensors")}  # loaded, and no numbered copies
    log = a1111.data / "textual_inversion" / datetime.date.today().isoformat() / "zqx"
    assert Path(job.result["folder"]) == log
    assert {p.name for p in log.iterdir()} >= {"config.json", "loss.csv", "resume.pt", "checkpoints"}
    assert [p.name for p in (log / "checkpoints").iterdir()] == ["zqx-2.safetensors"]
    assert [o.name for o in extension.service().outputs()] == ["zqx"]


@pytest.mark.parametrize(("limit", "moved"), [(20, True), (5, False)])
def test_prompts_wrap_at_commas_as_a1111s_word_wrap_setting_says(a1111, standalone, limit, moved) -> None:
    """ "Prompt word wrap length limit" (`comma_padding_backtrack`): the 10 tokens after the comma
    move to the second chunk when the limit is 20, and stay in the first when it is 5."""
    a1111.load(standalone["sd1"])
    a1111.shared.opts.comma_padding_backtrack = limit
    with extension.make_host().session() as model:
        tokenizer = model.text_encoders[0].tokenizer
        ids = tokenize([" ".join(["ball"] * 64 + [","] + ["ball"] * 15)], tokenizer).ids[0]
    ball = tokenizer.encode("ball")[0]
    assert (ids[1, 1:16] == ball).all().item() is moved
    assert (ids[0, 66:76] == ball).all().item() is not moved
