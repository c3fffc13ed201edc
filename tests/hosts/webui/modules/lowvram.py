"""Stand-in for `modules.lowvram`: --medvram/--lowvram keep big modules on the CPU and move them to the
GPU in forward pre-hooks, one at a time. `hook_calls` counts the moves the hooks ask for."""

import torch

from modules import devices, shared

module_in_gpu = None
cpu = torch.device("cpu")
hook_calls = []


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model):
    opts = shared.cmd_opts
    return opts.lowvram or opts.medvram or (opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def is_enabled(sd_model):
    return sd_model.lowvram


def setup_for_low_vram(sd_model, use_medvram):
    """Hooks on the same modules as the host's (set up before the text models are wrapped)."""
    if getattr(sd_model, "lowvram", False):
        return
    sd_model.lowvram = True
    parents = {}

    def send_me_to_gpu(module, _):
        global module_in_gpu
        module = parents.get(module, module)
        hook_calls.append(type(module).__name__)
        if module_in_gpu is module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module

    if hasattr(sd_model, "conditioner"):
        sd_model.conditioner.register_forward_pre_hook(send_me_to_gpu)
    elif hasattr(sd_model.cond_stage_model, "model"):
        text = sd_model.cond_stage_model
        for module in (text.model, text.model.token_embedding):
            module.register_forward_pre_hook(send_me_to_gpu)
            parents[module] = text
    else:
        text = sd_model.cond_stage_model
        text.transformer.register_forward_pre_hook(send_me_to_gpu)
        parents[text.transformer] = text
    first_stage = sd_model.first_stage_model
    first_stage.register_forward_pre_hook(send_me_to_gpu)
    encode, decode = first_stage.encode, first_stage.decode

    def encode_wrap(x):
        send_me_to_gpu(first_stage, None)
        return encode(x)

    def decode_wrap(z):
        send_me_to_gpu(first_stage, None)
        return decode(z)

    first_stage.encode, first_stage.decode = encode_wrap, decode_wrap
    if use_medvram:
        sd_model.model.register_forward_pre_hook(send_me_to_gpu)
    else:
        unet = sd_model.model.diffusion_model
        for block in (unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks):
            block.register_forward_pre_hook(send_me_to_gpu)
