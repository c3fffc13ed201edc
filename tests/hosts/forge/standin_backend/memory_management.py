"""Stand-in for Forge's `backend.memory_management`: loading model patchers (one patcher per model at a
time: loading a clone unloads the others), and LoRA refreshes at load."""

import torch

current_loaded_models = []
load_calls = []
empty_cache_calls = 0


def get_torch_device():
    return torch.device("cpu")


def text_encoder_device():
    return get_torch_device()


def vae_device():
    return get_torch_device()


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def model_load(self):
        self.model.model_patches_to(self.device)
        self.model.model_patches_to(self.model.model_dtype())
        self.model.forge_patch_model(self.device)
        self.model.refresh_loras()

    def model_unload(self, avoid_model_moving=False):
        self.model.forge_unpatch_model(None if avoid_model_moving else self.model.offload_device)
        if not avoid_model_moving:
            self.model.model_patches_to(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    for index in reversed(range(len(current_loaded_models))):
        if model.is_clone(current_loaded_models[index].model):
            current_loaded_models.pop(index).model_unload(avoid_model_moving=True)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    load_calls.append(list(models))
    to_load = []
    for model in models:
        loaded = LoadedModel(model)
        if loaded in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(loaded)))
        else:
            to_load.append(loaded)
    for loaded in to_load:
        unload_model_clones(loaded.model)
    for loaded in to_load:
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().model_unload()


def soft_empty_cache(force=False):
    global empty_cache_calls
    empty_cache_calls += 1
