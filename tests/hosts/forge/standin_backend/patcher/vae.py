"""Stand-in for Forge's `VAE` patcher object."""

import torch
from backend.patcher.base import ModelPatcher

CPU = torch.device("cpu")


class VAE:
    def __init__(self, model, device=CPU, dtype=torch.float32):
        self.first_stage_model = model.eval()
        self.device = device
        self.vae_dtype = dtype
        self.patcher = ModelPatcher(model, load_device=device, offload_device=CPU)
