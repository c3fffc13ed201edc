"""LoRA, LoCon and DoRA in kohya format: `network` (the modules), `file` (the files), `method` (training)."""

from lib_training.methods.lora.method import SPEC, LoraConfig, LoraMethod

__all__ = ["SPEC", "LoraConfig", "LoraMethod"]
