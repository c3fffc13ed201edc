"""Builds the models the stand-in WebUIs hold, from our tiny standalone models (same weights).

A1111: ldm `LatentDiffusion` (SD1, SD2) or sgm `DiffusionEngine` (SDXL), text models wrapped by
`model_hijack.hijack` as A1111 does, attention optimisation applied. Forge: an engine whose
`forge_objects` hold patchers around a KModel, HF text encoders and the VAE, every weight created
under `torch.inference_mode()` as Forge's loader does.
"""

from __future__ import annotations

import copy

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from lib_training.formats.family import Arch
from lib_training.model.networks.text_encoder import ClipTextEncoder, causal_mask, open_clip_to_hf
from lib_training.model.networks.tokenizer import BOS_ID, EOS_ID, _bpe


class CLIPTokenizerLike:
    """The part of HF's `CLIPTokenizer` the hosts use, over open_clip's BPE (the same vocabulary)."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, texts, truncation=False, add_special_tokens=False, **kwargs):
        if isinstance(texts, str):
            return {"input_ids": _bpe().encode(texts)}
        return {"input_ids": [_bpe().encode(text) for text in texts]}

    def get_vocab(self):
        return dict(_bpe().encoder)


def hf_config(encoder: ClipTextEncoder) -> CLIPTextConfig:
    """The HF `CLIPTextConfig` of one of our text towers."""
    c = encoder.config
    return CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=4 * c.width,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.context_length,
        hidden_act="quick_gelu" if c.activation == "quick_gelu" else "gelu",
        layer_norm_eps=1e-5,
        eos_token_id=2,  # as in the configs the hosts ship: pooling at the highest id (EOS)
    )


def load_hf_weights(model: torch.nn.Module, encoder: ClipTextEncoder) -> torch.nn.Module:
    """Give an HF `CLIPTextModel` (with an optional Forge-style `text_projection`) `encoder`'s weights."""
    state = open_clip_to_hf(encoder.state_dict())
    projection = state.pop("text_projection.weight", None)
    state.pop("logit_scale", None)
    if hasattr(model, "text_projection"):
        state["text_projection.weight"] = projection
    model.load_state_dict(state)
    return model


def hf_text_model(encoder: ClipTextEncoder) -> CLIPTextModel:
    return load_hf_weights(CLIPTextModel(hf_config(encoder)), encoder)


def open_clip_tower(encoder: ClipTextEncoder) -> ClipTextEncoder:
    """A copy of `encoder` (open_clip layout) with open_clip's `attn_mask` attribute."""
    tower = copy.deepcopy(encoder)
    tower.attn_mask = causal_mask(encoder.config.context_length, torch.device("cpu"), torch.float32)
    return tower


def _load(module: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    module.load_state_dict(source.state_dict())
    return module


def _reclass(root, mapping):
    for module in root.modules():
        cls = mapping.get(type(module))
        if cls is not None:
            module.__class__ = cls


# --- A1111 ---------------------------------------------------------------------------------------
def build_a1111(standalone, medvram: bool = False):
    """`shared.sd_model` as A1111 1.10 would hold it after loading this model."""
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.modules.diffusionmodules import openaimodel as ldm_unet
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
    from modules import lowvram, sd_hijack, shared
    from sgm.models.diffusion import DiffusionEngine
    from sgm.modules.diffusionmodules import openaimodel as sgm_unet
    from sgm.modules.encoders import modules as sgm_encoders

    from lib_training.model.networks.vae import AutoencoderKL

    family = standalone.family
    sdxl = family.arch is Arch.SDXL
    unet_module = sgm_unet if sdxl else ldm_unet
    unet = _load(unet_module.UNetModel(standalone.unet_module.config), standalone.unet_module)
    vae = _load(AutoencoderKL(standalone.vae_module.config), standalone.vae_module)
    _reclass(vae, unet_module.VAE_CLASSES)
    alphas = standalone.schedule.alphas_cumprod
    if family.arch is Arch.SD1:
        text = FrozenCLIPEmbedder(CLIPTokenizerLike(EOS_ID), hf_text_model(standalone.text_encoders[0]))
    elif family.arch is Arch.SD2:
        text = FrozenOpenCLIPEmbedder(open_clip_tower(standalone.text_encoders[0]), layer="penultimate")
    else:
        clip_l, clip_g = standalone.text_encoders
        text = sgm_encoders.GeneralConditioner(
            [
                sgm_encoders.FrozenCLIPEmbedder(
                    CLIPTokenizerLike(EOS_ID), hf_text_model(clip_l), layer="hidden", layer_idx=clip_l.config.layers - 1
                ),
                sgm_encoders.FrozenOpenCLIPEmbedder2(open_clip_tower(clip_g)),
                *(sgm_encoders.ConcatTimestepEmbedderND() for _ in range(3)),
            ]
        )
    if sdxl:
        sd_model = DiffusionEngine(unet, vae, text, alphas, family.latent_scale)
    else:
        parameterization = "v" if family.prediction == "v" else "eps"
        sd_model = LatentDiffusion(unet, vae, text, alphas, family.latent_scale, parameterization)
        sd_model.is_sd1, sd_model.is_sd2 = family.arch is Arch.SD1, family.arch is Arch.SD2
    sd_model.eval()
    if medvram:
        shared.cmd_opts.medvram = True
        lowvram.setup_for_low_vram(sd_model, use_medvram=True)
    sd_hijack.model_hijack.hijack(sd_model)
    shared.sd_model = sd_model
    return sd_model


# --- Forge ---------------------------------------------------------------------------------------
def build_forge(standalone):
    """`shared.sd_model` as Forge would hold it after loading this model (loaded under inference mode)."""
    from backend.diffusion_engine.base import ForgeObjects, StableDiffusion, StableDiffusionXL
    from backend.modules.k_model import KModel
    from backend.modules.k_prediction import Prediction
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import forge_linears
    from backend.patcher.clip import CLIP
    from backend.patcher.unet import UnetPatcher
    from backend.patcher.vae import VAE
    from backend.text_processing.classic_engine import ClassicTextProcessingEngine
    from modules import shared

    family = standalone.family
    cpu = torch.device("cpu")
    with torch.inference_mode():
        # Forge builds its UNet and text towers with its own Linear class (not an nn.Linear)
        dm = forge_linears(_load(IntegratedUNet2DConditionModel(standalone.unet_module.config), standalone.unet_module))
        prediction = "v_prediction" if family.prediction == "v" else "epsilon"
        unet = UnetPatcher(KModel(dm, Prediction(standalone.schedule.alphas_cumprod, prediction)), cpu, cpu)
        vae = VAE(
            _load(IntegratedAutoencoderKL(standalone.vae_module.config, family.latent_scale), standalone.vae_module)
        )
        towers, tokenizers = {}, {}
        for encoder in standalone.text_encoders:
            # Forge gives every tower a projection, loaded where the checkpoint has one (not SD1's CLIP-L)
            tower = IntegratedCLIP(CLIPTextModel, hf_config(encoder), add_text_projection=encoder.key != "clip_l")
            load_hf_weights(tower.transformer, encoder)
            towers[encoder.key] = forge_linears(tower)
            tokenizers[encoder.key] = CLIPTokenizerLike(EOS_ID if encoder.key == "clip_l" else 0)
        clip = CLIP(towers, tokenizers)
        objects = ForgeObjects(unet, clip, vae, None)
        folder = shared.cmd_opts.embeddings_dir

        def engine(key, **kwargs):
            return ClassicTextProcessingEngine(
                getattr(clip.cond_stage_model, key),
                getattr(clip.tokenizer, key),
                embedding_dir=folder,
                embedding_key=key,
                **kwargs,
            )

        if family.arch is Arch.SDXL:
            sd_model = StableDiffusionXL(
                objects,
                engine("clip_l", minimal_clip_skip=2, final_layer_norm=False),
                engine("clip_g", minimal_clip_skip=2, final_layer_norm=False, text_projection=True, return_pooled=True),
            )
        else:
            key = standalone.text_encoders[0].key
            sd_model = StableDiffusion(objects, engine(key, minimal_clip_skip=1, final_layer_norm=True))
            sd_model.is_sd1, sd_model.is_sd2 = key == "clip_l", key == "clip_h"
    shared.sd_model = sd_model
    return sd_model
