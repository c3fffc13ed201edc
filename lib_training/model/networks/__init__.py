"""Our own Stable Diffusion model code, in the original (LDM) layout, used without a WebUI."""
