"""AUTOMATIC1111 1.10: SD1 and SD2 (ldm `LatentDiffusion`) and SDXL (sgm `DiffusionEngine`).

A session prepares `shared.sd_model` for training and undoes every step in reverse on exit:

1. --medvram: the UNet, text encoders and VAE all moved to the GPU for the job (no module is
   called through the hooks that would move them back and forth); --lowvram is refused.
2. The built-in Lora extension's merged networks are restored out of the weights (its own path:
   `network_apply_weights` with no network selected) and merged back afterwards.
3. `shared.loaded_hypernetworks` emptied (every attention forward applies them).
4. Every parameter frozen (ldm/sgm leave the UNet's trainable).
5. Attention: the WebUI's optimisation undone (unless "Use cross attention optimizations while
   training" is on) and, by default, PyTorch's SDPA used instead of the unoptimised attention;
   afterwards the very same functions are put back.
6. Gradient checkpointing, when asked for: instance `forward`s on the UNet's transformer and
   residual blocks, removed when turned off and on exit.

The model's parts are called directly (`diffusion_model`, the text towers, the VAE's encoder and
decoder), never through A1111's wrappers, so prompt-time state (`model_hijack.fixes`, emphasis)
is untouched. A1111 computes the UNet in `devices.dtype_unet`; the trainer autocasts to it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lib_training.errors import ConfigError, UserError
from lib_training.formats.family import Arch, ModelFamily
from lib_training.hosts.model import HostDiffusionModel
from lib_training.hosts.snapshots import AttributeSnapshot, frozen, verified_unchanged
from lib_training.hosts.text import HFTextEncoder, OpenClipTextEncoder
from lib_training.hosts.tokenizers import HostTokenizer
from lib_training.hosts.vae import HostVAE
from lib_training.model.checkpointing import checkpoint
from lib_training.model.diffusion import TextEncoder
from lib_training.model.hooks import ModuleHooks
from lib_training.model.module_map import ModuleRoot
from lib_training.model.noise_schedule import NoiseSchedule
from lib_training.model.placement import module_device

LOWVRAM_MESSAGE = (
    "Training needs the whole model on the GPU, and --lowvram moves it there block by block during each "
    "step. Restart the WebUI without --lowvram to train (--medvram works: it needs VRAM for the UNet, the "
    "text encoders and the VAE at once while a job runs)."
)

# Where ldm and sgm keep what A1111's attention optimisations replace (class attributes and module globals).
_ATTENTION_CLASSES = ("ldm.modules.attention", "sgm.modules.attention")
_VAE_MODULES = ("ldm.modules.diffusionmodules.model", "sgm.modules.diffusionmodules.model")
_UNET_MODULES = ("ldm.modules.diffusionmodules.openaimodel", "sgm.modules.diffusionmodules.openaimodel")


def _optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _modules(names: tuple[str, ...]) -> list[ModuleType]:
    return [module for module in map(_optional_module, names) if module is not None]


# --- what the model is ----------------------------------------------------------------------------
def check_supported(sd_model: Any) -> Arch:
    """The family of A1111's loaded model, or a UserError saying why it cannot be trained here."""
    from modules import sd_unet, shared

    if sd_model is not None and shared.cmd_opts.lowvram:
        raise UserError(LOWVRAM_MESSAGE)
    unet = getattr(sd_unet, "current_unet", None)
    if sd_model is not None and unet is not None:
        label = getattr(getattr(unet, "option", None), "label", type(unet).__name__)
        raise UserError(
            f"the SD UNet '{label}' replaces the model's UNet and cannot be trained through; set 'SD Unet' to "
            "'None' in the settings (or the quick settings) and start again"
        )
    return model_arch(sd_model)


def model_arch(sd_model: Any) -> Arch:
    """The family of A1111's loaded model (what training also needs of the setup: `check_supported`)."""
    if sd_model is None:
        raise UserError("no model is loaded in the WebUI; choose a Stable Diffusion checkpoint first")
    if getattr(sd_model, "is_sd3", False):
        raise UserError("SD3 models cannot be trained here; load an SD1, SD2 or SDXL checkpoint")
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        towers = _sdxl_towers(sd_model)
        if towers is None:
            raise UserError(
                "this SDXL model has no CLIP-L + OpenCLIP bigG text encoder pair (an SDXL refiner?); "
                "load an SDXL base model"
            )
        return Arch.SDXL
    wrapped = getattr(getattr(sd_model, "cond_stage_model", None), "wrapped", None)
    if hasattr(wrapped, "model"):
        return Arch.SD2
    if hasattr(wrapped, "transformer") and hasattr(getattr(wrapped, "transformer", None), "text_model"):
        return Arch.SD1
    raise UserError(
        f"the loaded model ({type(sd_model).__name__} with {type(sd_model.cond_stage_model).__name__}) "
        "is not an SD1, SD2 or SDXL model this extension can train"
    )


def _sdxl_towers(sd_model: Any) -> tuple[Any, Any] | None:
    """(CLIP-L wrapper, OpenCLIP bigG wrapper) among SDXL's conditioner embedders."""
    embedders = [e for e in sd_model.conditioner.embedders if hasattr(e, "wrapped")]
    clip_l = [e for e in embedders if hasattr(e.wrapped, "transformer")]
    clip_g = [e for e in embedders if hasattr(e.wrapped, "model")]
    if len(clip_l) != 1 or len(clip_g) != 1:
        return None
    return clip_l[0], clip_g[0]


def text_root(sd_model: Any) -> nn.Module:
    """The module holding every text tower: SDXL's conditioner, else the hijacked cond_stage_model."""
    return sd_model.conditioner if hasattr(sd_model, "conditioner") else sd_model.cond_stage_model


def host_modules(sd_model: Any) -> dict[str, nn.Module]:
    """Named host modules (for hashing): UNet, VAE, text encoders by their TI key."""
    arch = model_arch(sd_model)
    modules: dict[str, nn.Module] = {
        "unet": sd_model.model.diffusion_model,
        "vae": sd_model.first_stage_model,
    }
    if arch is Arch.SD1:
        modules["clip_l"] = sd_model.cond_stage_model.wrapped.transformer
    elif arch is Arch.SD2:
        modules["clip_h"] = sd_model.cond_stage_model.wrapped.model
    else:
        clip_l, clip_g = _sdxl_towers(sd_model)  # type: ignore[misc]
        modules["clip_l"], modules["clip_g"] = clip_l.wrapped.transformer, clip_g.wrapped.model
    return modules


def module_roots(sd_model: Any) -> list[ModuleRoot]:
    """Where the module map finds the layers: the ldm/sgm UNet, the HF CLIP-L `CLIPTextModel`s and
    the open_clip towers (fused q/k/v), each at its checkpoint prefix (the same objects as
    `host_modules`)."""
    layouts = {"unet": "ldm", "clip_l": "hf", "clip_h": "open_clip", "clip_g": "open_clip"}
    modules = host_modules(sd_model)
    return [ModuleRoot(key, modules[key], layout) for key, layout in layouts.items() if key in modules]  # type: ignore[arg-type]


def build_model(sd_model: Any, checkpointing: Checkpointing | None = None) -> HostDiffusionModel:
    """The interface over A1111's loaded model (valid while the session that built it is open; a
    session checks the setup first, `check_supported`)."""
    from modules import devices, shared

    arch = model_arch(sd_model)
    opts = shared.opts
    dm = sd_model.model.diffusion_model
    prediction = "v" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
    family = ModelFamily(arch, prediction, int(dm.input_blocks[0][0].in_channels))
    scale = float(getattr(sd_model, "scale_factor", family.latent_scale))
    if abs(scale - family.latent_scale) > 1e-6:
        raise UserError(
            f"this model's VAE scale factor is {scale}, not {family.latent_scale} as for {family.name}; "
            "it cannot be trained here"
        )
    device = torch.device(devices.device)
    skip = max(1, int(getattr(opts, "CLIP_stop_at_last_layers", 1)))
    backtrack = int(getattr(opts, "comma_padding_backtrack", 20))
    encoders: list[TextEncoder] = []
    if arch is Arch.SD1:
        wrapper = sd_model.cond_stage_model
        text_model = wrapper.wrapped.transformer.text_model
        encoders.append(
            HFTextEncoder(
                "clip_l", HostTokenizer(wrapper, backtrack), text_model, layer=-skip, final_norm=True, device=device
            )
        )
    elif arch is Arch.SD2:
        wrapper = sd_model.cond_stage_model
        encoders.append(
            OpenClipTextEncoder("clip_h", HostTokenizer(wrapper, backtrack), wrapper.wrapped, device=device)
        )
    else:
        clip_l, clip_g = _sdxl_towers(sd_model)  # type: ignore[misc]
        embedder = clip_l.wrapped
        if getattr(opts, "sdxl_clip_l_skip", False) is True:
            layer, final_norm = -skip, False
        elif embedder.layer == "last":
            layer, final_norm = -1, True
        else:
            layer, final_norm = int(embedder.layer_idx), False
        text_model = embedder.transformer.text_model
        encoders.append(
            HFTextEncoder(
                "clip_l",
                HostTokenizer(clip_l, backtrack),
                text_model,
                layer=layer,
                final_norm=final_norm,
                device=device,
            )
        )
        encoders.append(OpenClipTextEncoder("clip_g", HostTokenizer(clip_g, backtrack), clip_g.wrapped, device=device))
    alphas = getattr(sd_model, "alphas_cumprod_original", None)
    if alphas is None:
        alphas = sd_model.alphas_cumprod
    return HostDiffusionModel(
        family=family,
        unet=A1111UNet(dm),
        text_encoders=encoders,
        vae=HostVAE(sd_model.first_stage_model),
        schedule=NoiseSchedule(alphas.detach().float().cpu(), prediction),
        device=device,
        dtype=devices.dtype_unet,
        vae_dtype=devices.dtype_vae,
        modules=host_modules(sd_model),
        module_roots=module_roots(sd_model),
        checkpointing=checkpointing,
    )


class A1111UNet:
    """ldm/sgm `UNetModel` called directly: (x, timesteps, context, y) -> eps or v."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        self.diffusion_model = diffusion_model

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        return self.diffusion_model(x, timesteps, context=context, y=y)


# --- session steps ----------------------------------------------------------------------------------
@contextlib.contextmanager
def whole_model_on_device(sd_model: Any) -> Iterator[None]:
    """--medvram: UNet, text encoders and VAE on the GPU for the job; devices and the tracked
    `lowvram.module_in_gpu` as before afterwards. Without --medvram nothing happens."""
    if not getattr(sd_model, "lowvram", False):
        yield
        return
    from modules import devices, lowvram

    in_gpu = lowvram.module_in_gpu
    parts = [sd_model.model, text_root(sd_model), sd_model.first_stage_model]
    places = [(m, module_device(m)) for m in dict.fromkeys([*parts, in_gpu]) if m is not None]
    try:
        lowvram.send_everything_to_cpu()
        for module in parts:
            module.to(devices.device)
        yield
    finally:
        for module, device in places:
            if device is not None and module_device(module) != device:
                module.to(device)
        lowvram.module_in_gpu = in_gpu


def _lora_module() -> ModuleType | None:
    """The built-in Lora extension's `networks` module, if loaded (found by what it provides)."""
    networks = sys.modules.get("networks")
    needed = ("loaded_networks", "network_apply_weights", "network_restore_weights_from_backup")
    return networks if networks is not None and all(hasattr(networks, n) for n in needed) else None


def _lora_merged_layers(sd_model: Any) -> list[nn.Module]:
    """The layers the Lora extension has merged networks into. It names every submodule of the UNet
    and text encoders (containers included) but merges only when a layer of a class whose forward it
    patches runs (a MultiheadAttention merges its own `out_proj`); such a layer remembers the merged
    selection in `network_current_names`, empty when it holds none."""
    return [m for m in sd_model.modules() if getattr(m, "network_current_names", ()) != ()]


@contextlib.contextmanager
def loras_unmerged(sd_model: Any) -> Iterator[None]:
    """The Lora extension merges the selected networks into the weights (with backups) at forward
    time. Inside: no network selected and every merged layer back to its backup; afterwards the
    user's selection restored and merged again into the same layers the same way, on the same
    devices (bit-identical)."""
    networks = _lora_module()
    if networks is None:
        yield
        return
    layers = _lora_merged_layers(sd_model)
    selected = list(networks.loaded_networks)
    networks.loaded_networks.clear()
    try:
        with torch.no_grad():
            for layer in layers:
                networks.network_apply_weights(layer)
        yield
    finally:
        networks.loaded_networks[:] = selected
        with torch.no_grad():
            for layer in layers:
                networks.network_apply_weights(layer)


@contextlib.contextmanager
def hypernetworks_off() -> Iterator[None]:
    from modules import shared

    loaded = shared.loaded_hypernetworks
    saved = list(loaded)
    loaded.clear()
    try:
        yield
    finally:
        loaded[:] = saved


def sdpa_attention_forward(
    self: nn.Module, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, **extra: Any
) -> Tensor:
    """ldm/sgm `CrossAttention.forward` with PyTorch's scaled_dot_product_attention (differentiable)."""
    if extra.get("additional_tokens") is not None or extra.get("n_times_crossframe_attn_in_self", 0):
        raise ConfigError(
            "this model uses sgm's additional tokens or cross-frame attention, which training does not support; "
            "turn off the Training setting for PyTorch attention to train with the WebUI's own attention"
        )
    heads = self.heads
    source = x if context is None else context
    q, k, v = (
        rearrange(proj(inp), "b n (h d) -> b h n d", h=heads)
        for proj, inp in ((self.to_q, x), (self.to_k, source), (self.to_v, source))
    )
    if mask is not None:
        mask = rearrange(mask, "b ... -> b 1 1 (...)").bool()  # [B, 1, 1, M]: True where attended
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, N, dim_head]
    return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


@contextlib.contextmanager
def attention_for_training(use_sdpa: bool) -> Iterator[None]:
    """Undo the WebUI's attention optimisation as its own trainer does, optionally using SDPA;
    afterwards exactly the functions that were there (not re-applied from the options)."""
    from modules import sd_hijack, shared

    attention = _modules(_ATTENTION_CLASSES)
    vae_modules = _modules(_VAE_MODULES)
    snapshots = [AttributeSnapshot(m.CrossAttention, ["forward"]) for m in attention]
    snapshots += [AttributeSnapshot(m.AttnBlock, ["forward"]) for m in vae_modules]
    snapshots += [AttributeSnapshot(m, ["nonlinearity"]) for m in vae_modules]
    snapshots += [AttributeSnapshot(m, ["th"]) for m in _modules(_UNET_MODULES)]
    try:
        if not getattr(shared.opts, "training_xattention_optimizations", False):
            sd_hijack.undo_optimizations()
            if use_sdpa:
                for module in attention:
                    module.CrossAttention.forward = sdpa_attention_forward
        yield
    finally:
        for snapshot in reversed(snapshots):
            snapshot.restore()


def _checkpointed(function: Any, *args: Any, **kwargs: Any) -> Tensor:
    if torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


class Checkpointing:
    """Gradient checkpointing for ldm/sgm UNets: an instance `forward` on every BasicTransformerBlock
    and ResBlock that recomputes its `_forward` in the backward pass (ldm's own mechanism is off in
    A1111 and fails on frozen parameters)."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        classes = tuple(
            cls
            for module in (*_modules(_ATTENTION_CLASSES), *_modules(_UNET_MODULES))
            for cls in (getattr(module, "BasicTransformerBlock", None), getattr(module, "ResBlock", None))
            if isinstance(cls, type)
        )
        self.blocks = [m for m in diffusion_model.modules() if classes and isinstance(m, classes)]
        self.overrides = ModuleHooks()

    def __call__(self, enabled: bool) -> None:
        self.overrides.clear()
        if enabled:
            for block in self.blocks:
                self.overrides.install(block, "forward", functools.partial(_checkpointed, block._forward))


# --- the session ----------------------------------------------------------------------------------
class A1111Host:
    """The adapter for AUTOMATIC1111 1.10."""

    name = "AUTOMATIC1111"

    @contextlib.contextmanager
    def session(self, verify: bool = False, use_sdpa: bool = True) -> Iterator[HostDiffusionModel]:
        """The loaded model prepared for training; restored exactly on exit (see the module docstring)."""
        from modules import devices, shared

        sd_model = shared.sd_model
        check_supported(sd_model)
        with contextlib.ExitStack() as stack:
            if verify:
                stack.enter_context(verified_unchanged({"sd_model": sd_model}))
            stack.callback(devices.torch_gc)
            stack.enter_context(whole_model_on_device(sd_model))
            stack.enter_context(loras_unmerged(sd_model))
            stack.enter_context(hypernetworks_off())
            stack.enter_context(frozen(sd_model.parameters()))
            stack.enter_context(attention_for_training(use_sdpa))
            checkpointing = Checkpointing(sd_model.model.diffusion_model)
            stack.callback(checkpointing, False)
            yield build_model(sd_model, checkpointing)

    # --- results ------------------------------------------------------------------------------
    def publish(self, role: str, result: Path) -> None:
        """Make a new result usable without a restart: reload A1111's list for its folder's role."""
        from modules import sd_hijack, shared

        refresh = {
            "embeddings": lambda: sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(
                force_reload=True
            ),
            "hypernetworks": shared.reload_hypernetworks,
            "loras": refresh_lora_list,
        }
        refresh[role]()
        if role == "loras":
            forget_merged_lora(shared.sd_model, result)

    def refresh_checkpoints(self) -> None:
        from modules import sd_models

        sd_models.list_models()


def forget_merged_lora(sd_model: Any, result: Path) -> None:
    """A LoRA file written over one that the Lora extension has merged: the layers holding a selection
    with it go back to their backups, so the next generation merges what the file holds now.

    The extension reads a file again when it is newer than what it holds, but merges into a layer only
    when the selection's names and strengths differ from the layer's `network_current_names`; with the
    same tag in the prompt it would go on using the old file's merge."""
    networks = _lora_module()
    if networks is None or sd_model is None:
        return
    names = {result.stem} | {
        net.name
        for net in networks.loaded_networks
        if Path(getattr(getattr(net, "network_on_disk", None), "filename", "") or "") == result
    }
    stale = [
        layer
        for layer in _lora_merged_layers(sd_model)
        if any(selected[0] in names for selected in layer.network_current_names)
    ]
    selected = list(networks.loaded_networks)
    networks.loaded_networks.clear()
    try:
        with torch.no_grad():
            for layer in stale:
                networks.network_apply_weights(layer)  # nothing selected: back to its backup
    finally:
        networks.loaded_networks[:] = selected


def refresh_lora_list() -> None:
    """Rescan the Lora folder, if a Lora extension (A1111's or Forge's `networks`) is loaded."""
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()
