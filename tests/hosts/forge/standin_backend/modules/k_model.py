"""Stand-in for Forge's `KModel`: the UNet, its noise predictor, storage and computation dtypes."""

import torch


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, predictor, storage_dtype=torch.float32, computation_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = predictor
        self.storage_dtype = storage_dtype
        self.computation_dtype = computation_dtype
