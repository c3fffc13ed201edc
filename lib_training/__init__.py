"""sd-webui-training: training and merging for Stable Diffusion, inside a WebUI or standalone.

This package knows no host. Trainers work against the model interface in `interface.py`;
adapters (standalone model code here, A1111 and Forge glue in `scripts/`) build it.
"""

__version__ = "0.1.0"
