"""A LoRA trained over one the WebUI is applying (same name, overwritten): the next generation uses
the new file. Found in a real A1111 1.10.1 and Forge: without this, both went on applying the old one.

A1111's Lora extension reads a newer file again at the next generation, but merges into a layer only
when the selection's names and strengths change; Forge caches the files it read by file name and
rebuilds its patchers only when its selection hash changes."""

from __future__ import annotations

import functools

import torch

from lib_training.hosts import extension, settings


def _to_k(sd_model):
    return sd_model.model.diffusion_model.middle_block[1].transformer_blocks[0].attn2.to_k


def test_a1111_merges_a_lora_written_over_a_merged_one_from_the_new_file(a1111, standalone) -> None:
    sd_model = a1111.load(standalone["sd1"])
    networks = a1111.module("networks")
    networks.assign_network_names(sd_model)
    layer = _to_k(sd_model)
    base = layer.weight.detach().clone()
    networks.generate(sd_model, [networks.Network("style", {layer.network_layer_name: torch.full_like(base, 0.5)})])

    extension.make_host().publish("loras", settings.folder(settings.LORA_DIR) / "style.safetensors")
    # the next generation with <lora:style:1>: the extension holds the newer file's network
    new = torch.full_like(base, -0.25)
    networks.generate(sd_model, [networks.Network("style", {layer.network_layer_name: new})])

    assert torch.equal(layer.weight, base + new)


def test_a1111_keeps_the_merge_of_a_lora_other_than_the_one_written(a1111, standalone) -> None:
    sd_model = a1111.load(standalone["sd1"])
    networks = a1111.module("networks")
    networks.assign_network_names(sd_model)
    layer = _to_k(sd_model)
    networks.generate(sd_model, [networks.Network("style", {layer.network_layer_name: torch.ones_like(layer.weight)})])
    before = a1111.snapshot()
    merged = layer.weight.detach().clone()

    extension.make_host().publish("loras", settings.folder(settings.LORA_DIR) / "another.safetensors")

    assert torch.equal(layer.weight, merged)
    assert a1111.snapshot() == before


def _forge_with_read_lora(forge, standalone, path):
    """Forge after a generation with <lora:NAME:1>: the file read (cached) and the selection's hash."""
    sd_model = forge.load(standalone["sd1"])
    networks = forge.module("networks")
    reads = []

    @functools.lru_cache(maxsize=5)  # as Forge's networks.load_lora_state_dict
    def load_lora_state_dict(filename):
        reads.append(filename)
        return {}

    networks.load_lora_state_dict = load_lora_state_dict
    load_lora_state_dict(str(path))
    sd_model.current_lora_hash = str([[str(path), 1.0, 1.0, False]])
    # the UNet's weights hold the merge of those patches
    sd_model.forge_objects_original.unet.model.lora_loader.loaded_hash = str([(str(path), 1.0, 1.0, False)])
    return sd_model, load_lora_state_dict, reads


def _merged_hash(sd_model):
    return sd_model.forge_objects_original.unet.model.lora_loader.loaded_hash


def test_forge_reads_a_lora_written_over_one_it_has_read_at_the_next_generation(forge, standalone) -> None:
    path = settings.folder(settings.LORA_DIR) / "style.safetensors"
    sd_model, load_lora_state_dict, reads = _forge_with_read_lora(forge, standalone, path)
    selection, merged = sd_model.current_lora_hash, _merged_hash(sd_model)

    extension.make_host().publish("loras", path)

    assert sd_model.current_lora_hash != selection  # the same selection rebuilds Forge's patchers
    assert _merged_hash(sd_model) != merged  # and merges them into the weights again
    load_lora_state_dict(str(path))
    assert reads == [str(path), str(path)]  # and reads the file again


def test_forge_keeps_its_selection_when_another_lora_is_written(forge, standalone) -> None:
    path = settings.folder(settings.LORA_DIR) / "style.safetensors"
    sd_model, _, _ = _forge_with_read_lora(forge, standalone, path)
    selection, merged = sd_model.current_lora_hash, _merged_hash(sd_model)

    extension.make_host().publish("loras", path.with_name("another.safetensors"))

    assert (sd_model.current_lora_hash, _merged_hash(sd_model)) == (selection, merged)
