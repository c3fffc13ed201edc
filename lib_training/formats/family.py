"""Model families (SD1, SD2, SDXL) and the facts that follow from the family."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

Prediction = Literal["epsilon", "v"]


class Arch(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


# VAE latent scale factors (latent = vae_latent * scale).
_LATENT_SCALE = {Arch.SD1: 0.18215, Arch.SD2: 0.18215, Arch.SDXL: 0.13025}

# UNet input-channel counts of the variants: 4 plain, 8 instruct-pix2pix, 9 inpainting.
INPAINT_CHANNELS = 9
PIX2PIX_CHANNELS = 8


@dataclass(frozen=True)
class ModelFamily:
    """What kind of Stable Diffusion model this is.

    `name` is one of "sd1", "sd2", "sd2-v", "sdxl"; `unet_in_channels` tells the inpainting (9)
    and instruct-pix2pix (8) variants apart from the plain models (4).
    """

    arch: Arch
    prediction: Prediction = "epsilon"
    unet_in_channels: int = 4

    @property
    def name(self) -> str:
        if self.arch is Arch.SD2 and self.prediction == "v":
            return "sd2-v"
        return self.arch.value

    @property
    def is_inpainting(self) -> bool:
        return self.unet_in_channels == INPAINT_CHANNELS

    @property
    def is_instruct_pix2pix(self) -> bool:
        return self.unet_in_channels == PIX2PIX_CHANNELS

    @property
    def is_sdxl(self) -> bool:
        return self.arch is Arch.SDXL

    @property
    def latent_scale(self) -> float:
        return _LATENT_SCALE[self.arch]

    @property
    def default_size(self) -> int:
        """The training/generation resolution the family was trained at."""
        if self.arch is Arch.SDXL:
            return 1024
        if self.arch is Arch.SD2 and self.prediction == "v":
            return 768
        return 512

    def describe(self) -> str:
        variant = ""
        if self.is_inpainting:
            variant = " inpainting"
        elif self.is_instruct_pix2pix:
            variant = " instruct-pix2pix"
        return f"{self.name}{variant}"

    @classmethod
    def parse(cls, name: str) -> ModelFamily:
        """Parse "sd1", "sd2", "sd2-v" or "sdxl" (as written by `name`)."""
        key = name.strip().lower()
        if key == "sd2-v":
            return cls(Arch.SD2, "v")
        try:
            return cls(Arch(key))
        except ValueError:
            raise ValueError(f"unknown model family {name!r}; expected sd1, sd2, sd2-v or sdxl") from None
