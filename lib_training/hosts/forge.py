"""Forge: SD1, SD2 and SDXL engines (`backend.diffusion_engine`), trained through `forge_objects`.

A session works on the engine's original objects (`forge_objects_original`: no LoRA, no object
patches) and undoes every step in reverse on exit:

1. The original UNet and CLIP patchers are loaded through Forge's memory manager, which restores
   any LoRA merge; afterwards the patchers that were loaded before are loaded again (merging the
   user's LoRAs again, as Forge does after every refresh), in their order of before.
2. Inference tensors: Forge loads every weight under `torch.inference_mode()`, and autograd cannot
   save those for backward. Each one is replaced for the job by a normal frozen tensor over the
   same memory (no copy), and the original `Parameter` objects go back afterwards
   (`snapshots.trainable_parameters`).
3. Every other parameter frozen (the VAE's; its flags come back).
4. Forge's `BasicTransformerBlock._forward` adds in place after LayerNorms that saved their input,
   which breaks backward: each block gets an instance `_forward` doing the same out of place
   (without Forge's attention patches, which training never passes), removed on exit.
5. Gradient checkpointing, which Forge lacks (its `checkpoint()` raises when enabled): inside those
   block overrides, and instance `forward`s on the residual blocks; removed when turned off.

Forge computes without autocast in `computation_dtype`; the trainer autocasts to it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lib_training.errors import UserError
from lib_training.formats.family import Arch, ModelFamily
from lib_training.hosts.a1111 import refresh_lora_list
from lib_training.hosts.model import HostDiffusionModel
from lib_training.hosts.snapshots import frozen, trainable_parameters, verified_unchanged
from lib_training.hosts.text import HFTextEncoder
from lib_training.hosts.tokenizers import HostTokenizer
from lib_training.hosts.vae import HostVAE
from lib_training.model.checkpointing import checkpoint
from lib_training.model.diffusion import TextEncoder
from lib_training.model.hooks import ModuleHooks
from lib_training.model.module_map import ModuleRoot
from lib_training.model.noise_schedule import NoiseSchedule

# Text-processing engines of each family, with the text encoder (TI key) each one runs.
_ENGINES = {
    Arch.SD1: (("text_processing_engine", "clip_l"),),
    Arch.SD2: (("text_processing_engine", "clip_h"),),
    Arch.SDXL: (("text_processing_engine_l", "clip_l"), ("text_processing_engine_g", "clip_g")),
}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}


def check_supported(sd_model: Any) -> Arch:
    """The family of Forge's loaded engine, or a UserError saying why it cannot be trained here."""
    arch = model_arch(sd_model)
    kmodel = sd_model.forge_objects_original.unet.model
    if not isinstance(kmodel.storage_dtype, torch.dtype):
        raise UserError(
            f"the UNet is stored quantised ({kmodel.storage_dtype}); choose a normal (fp16/bf16/fp32) weight "
            "format for the model to train on it"
        )
    return arch


def model_arch(sd_model: Any) -> Arch:
    """The family of Forge's loaded engine (what training also needs of the setup: `check_supported`)."""
    if getattr(sd_model, "forge_objects_original", None) is None:
        raise UserError("no model is loaded in Forge; choose a Stable Diffusion checkpoint first")
    if getattr(sd_model, "is_sdxl", False):
        if not hasattr(sd_model, "text_processing_engine_l"):
            raise UserError("SDXL refiner models cannot be trained here; load an SDXL base model")
        arch = Arch.SDXL
    elif getattr(sd_model, "is_sd2", False):
        arch = Arch.SD2
    elif getattr(sd_model, "is_sd1", False):
        arch = Arch.SD1
    else:
        raise UserError(
            f"the loaded model ({type(sd_model).__name__}) is not an SD1, SD2 or SDXL model; only those can be "
            "trained here"
        )
    kmodel = sd_model.forge_objects_original.unet.model
    prediction = getattr(kmodel.predictor, "prediction_type", None)
    if prediction not in _PREDICTIONS or not hasattr(kmodel.predictor, "alphas_cumprod"):
        raise UserError(f"models predicting {prediction!r} cannot be trained here (only epsilon and v)")
    return arch


def host_modules(sd_model: Any) -> dict[str, nn.Module]:
    """Named host modules (for hashing): the whole KModel (UNet + predictor), VAE, text encoders."""
    objects = sd_model.forge_objects_original
    return {"unet": objects.unet.model, "vae": objects.vae.first_stage_model, "text": objects.clip.cond_stage_model}


def module_roots(sd_model: Any) -> list[ModuleRoot]:
    """Where the module map finds the layers: the UNet (LDM names) and every text tower's HF
    `CLIPTextModel` (separate q/k/v Linears, also for OpenCLIP-H and bigG)."""
    arch = model_arch(sd_model)
    objects = sd_model.forge_objects_original
    roots = [ModuleRoot("unet", objects.unet.model.diffusion_model, "ldm")]
    for _, key in _ENGINES[arch]:
        roots.append(ModuleRoot(key, getattr(objects.clip.cond_stage_model, key).transformer, "hf"))
    return roots


def build_model(sd_model: Any, blocks: ForgeBlocks | None = None) -> HostDiffusionModel:
    """The interface over Forge's loaded engine (valid while the session that built it is open; a
    session checks the setup first, `check_supported`)."""
    from modules import shared

    arch = model_arch(sd_model)
    objects = sd_model.forge_objects_original
    unet, clip, vae = objects.unet, objects.clip, objects.vae
    kmodel = unet.model
    dm = kmodel.diffusion_model
    prediction = _PREDICTIONS[kmodel.predictor.prediction_type]
    family = ModelFamily(arch, prediction, int(dm.input_blocks[0][0].in_channels))  # type: ignore[arg-type]
    fsm = vae.first_stage_model
    scale = float(getattr(fsm, "scaling_factor", family.latent_scale))
    shift = float(getattr(fsm, "shift_factor", 0) or 0)
    if abs(scale - family.latent_scale) > 1e-6 or shift != 0:
        raise UserError(
            f"this model's VAE scales latents by {scale} (shift {shift}), not {family.latent_scale} as for "
            f"{family.name}; it cannot be trained here"
        )

    loading = ForgeLoading(unet, clip, vae)
    device = torch.device(unet.load_device)
    skip = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1))
    encoders: list[TextEncoder] = []
    for attribute, key in _ENGINES[arch]:
        engine = getattr(sd_model, attribute)
        tower = getattr(clip.cond_stage_model, key)
        projection = None
        if engine.return_pooled and engine.text_projection and key != "clip_l":
            projection = tower.transformer.text_projection
        encoders.append(
            HFTextEncoder(
                key,
                HostTokenizer(engine),
                tower.transformer.text_model,
                layer=-max(skip, int(engine.minimal_clip_skip)),
                final_norm=bool(engine.final_layer_norm),
                projection=projection,
                device=device,
                prepare=loading.load_unet_and_text,
                # SD1's CLIP-L projection is left uninitialised by Forge's loader; the others are loaded
                feature_projection=None if key == "clip_l" else getattr(tower.transformer, "text_projection", None),
            )
        )
    return HostDiffusionModel(
        family=family,
        unet=ForgeUNet(dm, loading.load_for_unet),
        text_encoders=encoders,
        vae=HostVAE(fsm, prepare=loading.load_vae),
        schedule=NoiseSchedule(kmodel.predictor.alphas_cumprod.detach().float().cpu(), prediction),  # type: ignore[arg-type]
        device=device,
        dtype=kmodel.computation_dtype,
        vae_dtype=vae.vae_dtype,
        modules={"unet": dm, "vae": fsm, **{key: getattr(clip.cond_stage_model, key) for _, key in _ENGINES[arch]}},
        module_roots=module_roots(sd_model),
        checkpointing=None if blocks is None else blocks.set_checkpointing,
        offloading=loading.offloaded,
    )


class ForgeLoading:
    """What the training's calls ask Forge's memory manager to have on the GPU: the UNet and the text
    encoders, or only the UNet while the text encoders are offloaded (their outputs cached). Offloading
    a part unloads it as Forge itself does to free memory (to its offload device); Forge loads it again
    when it is next called (the VAE for a preview)."""

    def __init__(self, unet: Any, clip: Any, vae: Any) -> None:
        self.unet, self.clip, self.vae = unet, clip, vae
        self.with_text = True

    def load_unet_and_text(self) -> None:
        _load([self.unet, self.clip.patcher])

    def load_for_unet(self) -> None:
        _load([self.unet, self.clip.patcher] if self.with_text else [self.unet])

    def load_vae(self) -> None:
        _load([self.vae.patcher])

    @contextlib.contextmanager
    def offloaded(self, part: str) -> Iterator[None]:
        from backend import memory_management

        text = part == "text"
        patcher = self.clip.patcher if text else self.vae.patcher
        loaded = memory_management.current_loaded_models
        if text:
            self.with_text = False
        try:
            for index in reversed(range(len(loaded))):
                if loaded[index].model is patcher:
                    loaded.pop(index).model_unload()
            memory_management.soft_empty_cache()
            yield
        finally:
            if text:
                self.with_text = True


def _load(patchers: list[Any]) -> None:
    from backend import memory_management

    memory_management.load_models_gpu(patchers)


class ForgeUNet:
    """`IntegratedUNet2DConditionModel` called directly (integer timesteps, eps or v out), after making
    sure Forge's memory manager has it (and the text encoders) on the GPU."""

    def __init__(self, diffusion_model: nn.Module, prepare: Any) -> None:
        self.diffusion_model = diffusion_model
        self._prepare = prepare

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        self._prepare()
        # A fresh dict: Forge's default `{}` is shared between calls and the forward writes into it.
        return self.diffusion_model(x, timesteps, context=context, y=y, control=None, transformer_options={})


# --- transformer and residual blocks ------------------------------------------------------------------
def _block_body(block: nn.Module, x: Tensor, context: Tensor | None, options: dict[str, Any]) -> Tensor:
    """Forge's `BasicTransformerBlock._forward` without patches, every residual add out of place."""
    if block.ff_in:
        skip = x
        x = block.ff_in(block.norm_in(x))
        if block.is_res:
            x = x + skip
    n = block.attn1(block.norm1(x), context=context if block.disable_self_attn else None, transformer_options=options)
    x = x + n
    if block.attn2 is not None:
        x = x + block.attn2(block.norm2(x), context=context, transformer_options=options)
    y = block.ff(block.norm3(x))
    return y + x if block.is_res else y


class ForgeBlocks:
    """The instance overrides on a Forge UNet's blocks for one session (see the module docstring)."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        from backend.nn import unet as forge_unet

        self.transformer_blocks = [
            m for m in diffusion_model.modules() if isinstance(m, forge_unet.BasicTransformerBlock)
        ]
        self.res_blocks = [m for m in diffusion_model.modules() if isinstance(m, forge_unet.ResBlock)]
        self.checkpointing = False
        self._blocks = ModuleHooks()
        self._res = ModuleHooks()

    def install(self) -> None:
        for block in self.transformer_blocks:
            self._blocks.install(block, "_forward", functools.partial(self._transformer_forward, block))

    def _transformer_forward(
        self, block: nn.Module, x: Tensor, context: Tensor | None = None, transformer_options: dict | None = None
    ) -> Tensor:
        options = {} if transformer_options is None else transformer_options
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(_block_body, block, x, context, options, use_reentrant=False)
        return _block_body(block, x, context, options)

    def set_checkpointing(self, enabled: bool) -> None:
        self.checkpointing = enabled
        self._res.clear()
        if enabled:
            for block in self.res_blocks:
                self._res.install(block, "forward", functools.partial(_checkpointed_res_forward, block))

    def clear(self) -> None:
        self.checkpointing = False
        self._res.clear()
        self._blocks.clear()


def _checkpointed_res_forward(
    block: nn.Module, x: Tensor, emb: Tensor, transformer_options: dict | None = None
) -> Tensor:
    options = {} if transformer_options is None else transformer_options
    if torch.is_grad_enabled():
        return checkpoint(block._forward, x, emb, options, use_reentrant=False)
    return block._forward(x, emb, options)


# --- the session ----------------------------------------------------------------------------------
class ForgeHost:
    """The adapter for Forge (lllyasviel/stable-diffusion-webui-forge, 2024-2025)."""

    name = "Forge"

    @contextlib.contextmanager
    def session(self, verify: bool = False, use_sdpa: bool = True) -> Iterator[HostDiffusionModel]:
        """The loaded engine prepared for training; restored on exit (see the module docstring).
        `use_sdpa` is A1111's setting: Forge's attention is differentiable as it is."""
        from backend import memory_management
        from modules import sd_models

        sd_model, _ = sd_models.forge_model_reload()
        check_supported(sd_model)
        objects = sd_model.forge_objects_original
        unet, clip, vae = objects.unet, objects.clip, objects.vae
        previous = [loaded.model for loaded in memory_management.current_loaded_models]
        with contextlib.ExitStack() as stack:
            if verify:
                stack.enter_context(verified_unchanged(host_modules(sd_model)))
            stack.callback(memory_management.soft_empty_cache)
            stack.callback(_load_again, previous)
            memory_management.load_models_gpu([unet, clip.patcher])
            stack.enter_context(trainable_parameters([unet.model.diffusion_model, clip.cond_stage_model]))
            stack.enter_context(
                frozen(
                    [*unet.model.parameters(), *clip.cond_stage_model.parameters(), *vae.first_stage_model.parameters()]
                )
            )
            blocks = ForgeBlocks(unet.model.diffusion_model)
            stack.callback(blocks.clear)
            blocks.install()
            yield build_model(sd_model, blocks)

    # --- results ------------------------------------------------------------------------------
    def publish(self, role: str, result: Path) -> None:
        """Make a new result usable without a restart: reload Forge's list for its folder's role."""
        from modules import shared

        refresh = {
            "embeddings": _reload_embeddings,
            "hypernetworks": shared.reload_hypernetworks,
            "loras": refresh_lora_list,
        }
        refresh[role]()
        if role == "loras":
            forget_applied_lora(shared.sd_model, result)

    def refresh_checkpoints(self) -> None:
        from modules import sd_models

        sd_models.list_models()


def forget_applied_lora(sd_model: Any, result: Path) -> None:
    """A LoRA file written over one that Forge has read: Forge keeps the last files it read
    (`networks.load_lora_state_dict`, cached by file name), builds its LoRA patchers again only when the
    selection of files and strengths changes (`current_lora_hash`), and merges into a model's weights
    again only when the patches' files and strengths change (its `lora_loader.loaded_hash`), so it
    would go on applying the old file. All three are forgotten: the next generation reads the file and
    merges it (the loader first puts its backups back)."""
    cached = getattr(sys.modules.get("networks"), "load_lora_state_dict", None)
    if callable(getattr(cached, "cache_clear", None)):
        cached.cache_clear()
    if result.name in str(getattr(sd_model, "current_lora_hash", "")):
        sd_model.current_lora_hash = ""  # matches no selection: the next generation rebuilds the patchers
    objects = getattr(sd_model, "forge_objects_original", None)
    for patcher in (objects.unet, objects.clip.patcher) if objects is not None else ():
        loader = getattr(patcher.model, "lora_loader", None)
        if loader is not None and result.name in str(loader.loaded_hash):
            loader.loaded_hash = ""  # matches no patches: the next load restores the backups and merges anew


def _reload_embeddings() -> None:
    """Every embedding list Forge keeps: its text engines', the extra-networks page's and the API's."""
    from modules import shared

    sd_model = getattr(shared, "sd_model", None)
    for attribute in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
        engine = getattr(sd_model, attribute, None)
        if engine is not None:
            engine.embeddings.load_textual_inversion_embeddings()
    page = sys.modules.get("modules.ui_extra_networks_textual_inversion")
    databases = [page.embedding_db] if page is not None else []
    for database in [*databases, *_api_embedding_databases()]:
        database.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)


def _api_embedding_databases() -> list[Any]:
    """The embedding database of Forge's HTTP API (`/sdapi/v1/embeddings` lists it): the API object
    keeps its own, loaded when it starts and by `/sdapi/v1/refresh-embeddings` only. Found through
    the route's endpoint (a method of that object) on the apps the extension was started on."""
    from lib_training.hosts.extension import started_apps

    found: dict[int, Any] = {}
    for app in started_apps():
        for route in getattr(app, "routes", ()):
            if getattr(route, "path", None) == "/sdapi/v1/embeddings":
                database = getattr(getattr(route.endpoint, "__self__", None), "embedding_db", None)
                if database is not None:
                    found[id(database)] = database
    return list(found.values())


def _load_again(patchers: list[Any]) -> None:
    """Load the patchers that were loaded before the job (re-merging their LoRAs), as they were, and
    put them back in their order: `load_models_gpu` moves what it loads to the front, and Forge
    unloads from the back of `current_loaded_models` when it needs memory."""
    if patchers:
        from backend import memory_management

        memory_management.load_models_gpu(patchers)
        rank = {id(patcher): index for index, patcher in enumerate(patchers)}
        memory_management.current_loaded_models.sort(key=lambda loaded: rank.get(id(loaded.model), len(rank)))
