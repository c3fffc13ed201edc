"""Run by A1111 / Forge at start-up: install what this extension needs and the host lacks.

The host's `launch` module provides `is_installed` and `run_pip`. Torch, torchvision and
gradio belong to the host and are never installed or upgraded here.
"""

import launch  # provided by the host WebUI

# (import name, pip requirement). Only packages the hosts may lack; never torch or gradio.
REQUIREMENTS = [
    ("safetensors", "safetensors>=0.4"),
    ("einops", "einops>=0.7"),
    ("open_clip", "open_clip_torch>=2.20"),
]

for module, requirement in REQUIREMENTS:
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"sd-webui-training requirement: {requirement}")
