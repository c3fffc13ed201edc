"""The model interface: everything a trainer or sampler needs from a loaded Stable Diffusion model.

Trainers, samplers and methods see only `DiffusionModel`. Adapters build one from our standalone
model code (`lib_training.model.standalone`), from A1111's loaded model or from Forge's; the pieces they
provide satisfy the small protocols below.

Tensor conventions:
- images: [B, 3, H, W], values in [-1, 1]
- latents: [B, 4, H/8, W/8], already multiplied by the family's latent scale
- token ids: [B, 77] per 75-token chunk (BOS + 75 + EOS/padding)
- context: [B, 77 * chunks, C] where C is the UNet's cross-attention width
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lib_training.formats.family import ModelFamily
from lib_training.model.networks.timestep import timestep_embedding
from lib_training.model.noise_schedule import NoiseSchedule

if TYPE_CHECKING:
    from lib_training.model.module_map import ModuleMap, ModuleRoot

LatentSampling = Literal["mean", "random"]
OffloadPart = Literal["text", "vae"]


class Tokenizer(Protocol):
    """Byte-pair tokenizer of a CLIP text encoder."""

    bos_id: int
    eos_id: int
    pad_id: int
    comma_backtrack: int  # a full chunk moves the tokens after a comma fewer than this many back on (0: never)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...


@dataclass
class TextEncoderOutput:
    hidden: Tensor  # [B, 77, C_enc] the layer the UNet is conditioned on
    pooled: Tensor | None = None  # [B, P] projected pooled output (SDXL's OpenCLIP bigG only)


@runtime_checkable
class TextEncoder(Protocol):
    """One CLIP text tower, split so that token embeddings can be replaced (textual inversion).

    Towers that can be copied (aesthetic gradients) also have `tower_weights()` (see
    `lib_training.model.networks.text_encoder.TowerWeights`).
    """

    key: str  # "clip_l" (SD1, SDXL), "clip_h" (SD2), "clip_g" (SDXL): names the part in TI files
    tokenizer: Tokenizer
    token_embedding: nn.Embedding  # [vocab, width]

    @property
    def width(self) -> int:
        """Width of the token embeddings (768 CLIP-L, 1024 OpenCLIP-H, 1280 OpenCLIP-bigG)."""
        ...

    def encode_embeddings(self, embeds: Tensor, ids: Tensor) -> TextEncoderOutput:
        """Run the transformer on token embeddings [B, 77, width]; `ids` [B, 77] locate EOS for pooling."""
        ...


@dataclass
class LatentDistribution:
    """Diagonal Gaussian over unscaled VAE latents."""

    mean: Tensor  # [B, 4, h, w]
    logvar: Tensor  # [B, 4, h, w]

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        std = torch.exp(0.5 * self.logvar.clamp(-30.0, 20.0))
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + std * noise


class VAE(Protocol):
    def encode(self, images: Tensor) -> LatentDistribution:
        """images [B, 3, H, W] in [-1, 1] -> distribution over unscaled latents."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1]."""
        ...


class UNet(Protocol):
    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """Model output (epsilon or v) for x_t [B, c_in, h, w] at integer timesteps [B]."""
        ...


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL micro-conditioning of one image: sizes in pixels as (height, width), crop as (top, left)."""

    original: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    target: tuple[int, int] | None = None  # defaults to `original`

    def values(self) -> tuple[int, int, int, int, int, int]:
        target = self.target or self.original
        return (*self.original, *self.crop, *target)


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts."""

    context: Tensor  # [B, 77 * chunks, C] cross-attention context
    y: Tensor | None = None  # [B, adm] SDXL vector: pooled text embedding + size embeddings
    pooled: Tensor | None = None  # [B, P] SDXL pooled text embedding (also the first P values of y)

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning(
            self.context.to(dtype),
            None if self.y is None else self.y.to(dtype),
            None if self.pooled is None else self.pooled.to(dtype),
        )


# Per text encoder key ("clip_l", "clip_h", "clip_g"): vectors [n_vectors, width] of one embedding.
EmbeddingVectors = Mapping[str, Tensor]

SIZE_EMBED_DIM = 256  # SDXL embeds each of the six size values with a 256-wide sinusoid


@dataclass
class DiffusionModel:
    """A loaded model seen through the interface; built by an adapter, owned by its host.

    `dtype` is the dtype of the frozen weights. Methods never modify the weights: anything that
    trains attaches its own parameters and detaches them again.
    """

    family: ModelFamily
    unet: UNet
    text_encoders: list[TextEncoder]
    vae: VAE
    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype | None = None  # SDXL's VAE overflows in fp16; adapters may keep it in fp32
    modules: dict[str, nn.Module] = field(default_factory=dict)  # named torch modules, for hashing/freezing
    module_roots: list[ModuleRoot] = field(default_factory=list)  # where the hookable layers are (module_map)
    _module_map: ModuleMap | None = field(default=None, init=False, repr=False, compare=False)

    def set_gradient_checkpointing(self, enabled: bool, fraction: float = 1.0) -> None:
        """Recompute activations in the backward pass (less memory); `fraction` of the UNet's blocks,
        highest resolution first, where the adapter supports a fraction. Adapters that can, override this."""
        if enabled:
            from lib_training.errors import ConfigError

            raise ConfigError("gradient checkpointing is not available for this model")

    def offloaded(self, part: OffloadPart) -> contextlib.AbstractContextManager[None]:
        """Inside: the text encoders ("text") or the VAE ("vae") are on the CPU, off the model's device,
        and must not be called (training on cached text outputs and latents); on exit they are back
        where they were. Adapters of hosts that place models themselves override this."""
        from lib_training.model.placement import moved_to

        if part == "text":
            return moved_to(self.modules[e.key] for e in self.text_encoders if e.key in self.modules)
        return moved_to([self.modules["vae"]] if "vae" in self.modules else [])

    def module_map(self) -> ModuleMap:
        """Every hookable layer by kohya name, checkpoint key and kind (built on first call, then cached).

        See `lib_training.model.module_map`; the adapter that built this model says where its
        layers are in `module_roots`.
        """
        if self._module_map is None:
            from lib_training.model.module_map import build_module_map

            if not self.module_roots:
                raise ValueError(f"this {type(self).__name__} was built without module roots; it has no module map")
            self._module_map = build_module_map(self.family.arch, self.module_roots)
        return self._module_map

    # --- text -----------------------------------------------------------------------------
    def text_encoder(self, key: str) -> TextEncoder:
        for encoder in self.text_encoders:
            if encoder.key == key:
                return encoder
        raise KeyError(f"this model has no text encoder {key!r} (it has {[e.key for e in self.text_encoders]})")

    def encode_prompts(
        self,
        prompts: Sequence[str],
        embeddings: Mapping[str, EmbeddingVectors] | None = None,
        sizes: Sequence[SizeConditioning] | None = None,
        min_chunks: int = 1,
    ) -> Conditioning:
        """Condition on prompts; `embeddings` maps textual-inversion names used in the prompts to vectors.

        Every prompt gets the same number of 75-token chunks (at least `min_chunks`), so the
        context is [B, 77 * chunks, C]. SDXL needs `sizes` (one per prompt); when omitted the
        family's default square size is used.
        """
        from lib_training.model.prompt import count_chunks, encode_with_encoder

        embeddings = embeddings or {}
        chunks = max(min_chunks, *(count_chunks(prompts, e.tokenizer, embeddings) for e in self.text_encoders))
        outputs = [encode_with_encoder(e, prompts, embeddings, chunks) for e in self.text_encoders]
        context = torch.cat([out.hidden for out in outputs], dim=-1)
        if not self.family.is_sdxl:
            return Conditioning(context)
        pooled = outputs[-1].pooled
        if pooled is None:
            raise ValueError("SDXL's second text encoder must return a pooled output")
        if sizes is None:
            side = self.family.default_size
            sizes = [SizeConditioning((side, side))] * len(prompts)
        return Conditioning(context, self.size_vector(pooled, sizes), pooled)

    def count_chunks(self, prompts: Sequence[str], embeddings: Mapping[str, EmbeddingVectors] | None = None) -> int:
        """75-token chunks the longest prompt needs (to encode a prompt and its negative alike)."""
        from lib_training.model.prompt import count_chunks

        return max(count_chunks(prompts, e.tokenizer, embeddings or {}) for e in self.text_encoders)

    def size_vector(self, pooled: Tensor, sizes: Sequence[SizeConditioning]) -> Tensor:
        """SDXL's y: [B, P + 6 * 256] = pooled text embedding, then the embedded sizes."""
        values = torch.tensor([s.values() for s in sizes], dtype=torch.float32, device=pooled.device)  # [B, 6]
        embedded = timestep_embedding(values.flatten(), SIZE_EMBED_DIM).reshape(len(sizes), -1)
        return torch.cat([pooled.float(), embedded], dim=-1).to(pooled.dtype)

    # --- images ---------------------------------------------------------------------------
    def encode_images(
        self, images: Tensor, sampling: LatentSampling = "mean", generator: torch.Generator | None = None
    ) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] in the model's dtype."""
        dist = self.encode_latent_distribution(images)
        latents = dist.mean if sampling == "mean" else dist.sample(generator)
        return (latents * self.family.latent_scale).to(self.dtype)

    def encode_latent_distribution(self, images: Tensor) -> LatentDistribution:
        """The VAE's unscaled latent distribution, for caching before the sampling choice is made."""
        vae_dtype = self.vae_dtype or self.dtype
        dist = self.vae.encode(images.to(self.device, vae_dtype))
        return LatentDistribution(dist.mean.float(), dist.logvar.float())

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images [B, 3, H, W] clamped to [-1, 1], float32."""
        vae_dtype = self.vae_dtype or self.dtype
        images = self.vae.decode((latents.float() / self.family.latent_scale).to(self.device, vae_dtype))
        return images.float().clamp(-1.0, 1.0)

    # --- denoising ------------------------------------------------------------------------
    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Conditioning, image_cond: Tensor | None = None) -> Tensor:
        """UNet output for x_t [B, 4, h, w] at integer timesteps [B] under `cond`.

        Inpainting (9-channel) and instruct-pix2pix (8-channel) UNets take `image_cond` [B, 5 or 4,
        h, w] appended to x_t; without one they get the neutral conditioning of a text-to-image
        run: for inpainting a full mask and the latent of a grey image, for pix2pix zeros.
        """
        x = _cast(x_t, self.dtype)
        if self.family.unet_in_channels > x.shape[1]:
            if image_cond is None:
                image_cond = self.neutral_image_conditioning(x)
            x = torch.cat([x, _cast(image_cond, x.dtype)], dim=1)
        y = None if cond.y is None else _cast(cond.y, self.dtype)  # cond.pooled is not the UNet's: not cast
        return self.unet(x, timesteps, _cast(cond.context, self.dtype), y)

    @torch.no_grad()
    def neutral_image_conditioning(self, latents: Tensor) -> Tensor:
        """Image conditioning of an unmasked text-to-image run, shaped for `latents` [B, 4, h, w]."""
        B, _, h, w = latents.shape
        extra = self.family.unet_in_channels - latents.shape[1]
        if not self.family.is_inpainting:
            return latents.new_zeros(B, extra, h, w)
        grey = torch.zeros(1, 3, h * 8, w * 8, device=self.device)  # 0 is mid-grey in [-1, 1]
        masked = self.encode_images(grey).to(latents)
        mask = latents.new_ones(1, 1, h, w)
        return torch.cat([mask, masked], dim=1).expand(B, -1, -1, -1)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor.to(dtype)`, without an operator call when it has that dtype already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
