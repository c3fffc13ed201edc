"""Stand-in for Forge's `UnetPatcher`."""

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    pass
