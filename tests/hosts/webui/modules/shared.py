"""Stand-in for `modules.shared`: options, command line, progress state, the loaded model."""

import argparse
import os

from modules import options, paths, shared_state

OptionInfo = options.OptionInfo
options_section = options.options_section

cmd_opts = argparse.Namespace(
    data_dir=paths.data_path,
    embeddings_dir=os.path.join(paths.data_path, "embeddings"),
    hypernetwork_dir=os.path.join(paths.models_path, "hypernetworks"),
    lora_dir=os.path.join(paths.models_path, "Lora"),
    ckpt_dir=None,
    vae_dir=None,
    lowvram=False,
    medvram=False,
    medvram_sdxl=False,
    no_half=True,
    no_half_vae=True,
    upcast_sampling=False,
    precision="full",
    api=True,
    nowebui=False,
)

_builtin = {
    "sd_model_checkpoint": "tiny.safetensors [0123456789]",
    "CLIP_stop_at_last_layers": 1,
    "comma_padding_backtrack": 20,
    "sdxl_clip_l_skip": False,
    "training_xattention_optimizations": False,
    "cross_attention_optimization": "Automatic",
    "emphasis": "Original",
    "live_previews_enable": True,
    "live_previews_image_format": "png",
    "show_progress_every_n_steps": 10,
    "interrupt_after_current": True,
    "lora_functional": False,
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sd_hypernetwork": "None",
    "extra_networks_default_multiplier": 1.0,
}
opts = options.Options({key: OptionInfo(value) for key, value in _builtin.items()})
state = shared_state.State()

sd_model = None
loaded_hypernetworks = []
hypernetworks = {}
parallel_processing_allowed = True
demo = None
hypernetwork_reloads = 0


def reload_hypernetworks():
    global hypernetwork_reloads
    hypernetwork_reloads += 1
    hypernetworks.clear()
    folder = cmd_opts.hypernetwork_dir
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            hypernetworks[os.path.splitext(name)[0]] = os.path.join(folder, name)
