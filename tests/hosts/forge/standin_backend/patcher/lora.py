"""Stand-in for Forge's `LoraLoader`: on refresh (under inference mode), the backed-up original
Parameters go back, then every patched weight is replaced by a new merged Parameter."""

import torch

CPU = torch.device("cpu")


def get_attr(root, key):
    for part in key.split("."):
        root = getattr(root, part)
    return root


def set_attr(root, key, value):
    *parents, last = key.split(".")
    for part in parents:
        root = getattr(root, part)
    root._parameters[last] = value


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=CPU, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        for key, weight in self.backup.items():
            set_attr(self.model, key, weight)
        self.backup = {}
        merged = {}
        for (_, strength_patch, _, _), patches in lora_patches.items():
            for key, deltas in patches.items():
                merged.setdefault(key, []).extend(strength_patch * d for d in deltas)
        for key, deltas in merged.items():
            weight = get_attr(self.model, key)
            self.backup[key] = weight.to(offload_device)
            set_attr(self.model, key, torch.nn.Parameter(weight + sum(deltas), requires_grad=False))
        self.loaded_hash = hashes
