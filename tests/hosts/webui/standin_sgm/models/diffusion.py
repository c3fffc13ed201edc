"""Stand-in for `sgm.models.diffusion.DiffusionEngine` (SDXL), as A1111 extends it."""

import torch


class OpenAIWrapper(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class DiffusionEngine(torch.nn.Module):
    def __init__(self, unet, first_stage_model, conditioner, alphas_cumprod, scale_factor):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.first_stage_model = first_stage_model
        self.conditioner = conditioner
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())  # A1111's extend_sdxl
        self.alphas_cumprod_original = alphas_cumprod.clone()
        self.scale_factor = scale_factor
        self.parameterization = "eps"
        self.lowvram = False
        self.is_sd1 = self.is_sd2 = self.is_ssd = self.is_sd3 = False
        self.is_sdxl = True
        for param in first_stage_model.parameters():
            param.requires_grad = False
