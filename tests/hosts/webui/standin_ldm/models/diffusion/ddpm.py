"""Stand-in for `ldm.models.diffusion.ddpm`: `LatentDiffusion` holding UNet, VAE and text encoder."""

import torch


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, diffusion_model, conditioning_key="crossattn"):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key


class LatentDiffusion(torch.nn.Module):
    def __init__(self, unet, first_stage_model, cond_stage_model, alphas_cumprod, scale_factor, parameterization):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.first_stage_model = first_stage_model
        self.cond_stage_model = cond_stage_model
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.alphas_cumprod_original = alphas_cumprod.clone()
        self.scale_factor = scale_factor
        self.parameterization = parameterization
        self.cond_stage_key = "txt"
        self.lowvram = False
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_ssd = self.is_sd3 = False
        for param in (*first_stage_model.parameters(), *cond_stage_model.parameters()):
            param.requires_grad = False  # ldm freezes the first and cond stages; the UNet stays trainable
