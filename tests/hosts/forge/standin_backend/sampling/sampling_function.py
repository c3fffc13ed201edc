"""Stand-in for Forge's `backend.sampling.sampling_function`: one UNet evaluation as its sampler makes
it, with the patcher loaded through the memory manager and a copy of the patcher's
`model_options["transformer_options"]` (its attention patches included) handed to the UNet."""

from backend import memory_management


def calc_cond(unet_patcher, x, timesteps, context, y=None):
    """The UNet's output [B, C, h, w] for latents x, integer timesteps [B] and context [B, M, width]."""
    memory_management.load_models_gpu([unet_patcher])
    model_options = unet_patcher.model_options
    transformer_options = model_options.get("transformer_options", {}).copy()
    transformer_options["cond_or_uncond"] = [0] * x.shape[0]
    diffusion_model = unet_patcher.model.diffusion_model
    return diffusion_model(x, timesteps, context=context, y=y, control=None, transformer_options=transformer_options)
