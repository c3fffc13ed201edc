"""Stand-in for Forge's `Prediction` (discrete schedule)."""

import torch


class Prediction(torch.nn.Module):
    def __init__(self, alphas_cumprod, prediction_type="epsilon"):
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
