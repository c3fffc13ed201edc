"""The discrete noise schedule of Stable Diffusion (1000 steps) and the training targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lib_training.formats.family import Prediction


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] (as many trailing singleton dims as `like` needs), on like's device."""
    values = values.to(device=like.device, dtype=torch.float32)
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


@dataclass
class NoiseSchedule:
    """alphas_cumprod over the training timesteps, and what the model predicts.

    All arithmetic is done in fp32; results are cast back to the input's dtype.
    """

    alphas_cumprod: Tensor  # [T] float32, decreasing from ~1 to ~0
    prediction: Prediction = "epsilon"

    @classmethod
    def scaled_linear(
        cls,
        prediction: Prediction = "epsilon",
        steps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ) -> NoiseSchedule:
        """The schedule every SD1/SD2/SDXL checkpoint was trained with."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas_cumprod.to(torch.float32), prediction)

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefficients(self, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), each shaped to broadcast against `like`."""
        ac = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return _expand(ac.sqrt(), like), _expand((1.0 - ac).sqrt(), like)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(a) * x0 + sqrt(1 - a) * noise."""
        a, s = self._coefficients(timesteps, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the model should output: the noise (epsilon) or v = sqrt(a) * noise - sqrt(1 - a) * x0."""
        if self.prediction == "epsilon":
            return noise
        a, s = self._coefficients(timesteps, x0)
        return (a * noise.float() - s * x0.float()).to(x0.dtype)

    def to_x0_and_eps(self, model_output: Tensor, x_t: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """Recover (x0, epsilon) from the model output at x_t."""
        a, s = self._coefficients(timesteps, x_t)
        out, x = model_output.float(), x_t.float()
        if self.prediction == "epsilon":
            eps = out
            x0 = (x - s * eps) / a
        else:
            x0 = a * x - s * out
            eps = s * x + a * out
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    def snr(self, timesteps: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep, [B] float32."""
        ac = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return ac / (1.0 - ac)

    def sigmas(self) -> Tensor:
        """k-diffusion sigmas sqrt((1 - a) / a) per timestep, [T] float32, increasing."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
