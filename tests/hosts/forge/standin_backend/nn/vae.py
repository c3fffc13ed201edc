"""Stand-in for Forge's `IntegratedAutoencoderKL`: our VAE with Forge's scaling attributes."""

from lib_training.model.networks.vae import AutoencoderKL


class IntegratedAutoencoderKL(AutoencoderKL):
    def __init__(self, config, scaling_factor, shift_factor=0.0):
        super().__init__(config)
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return latent / self.scaling_factor + self.shift_factor
