"""Stand-in for ldm's `openaimodel`: our UNet under ldm's class names and signatures."""

import ldm.modules.attention
import ldm.modules.diffusionmodules.model
import torch
from ldm.modules.diffusionmodules.util import checkpoint

from lib_training.model.networks import attention as our_attention
from lib_training.model.networks import unet as ours
from lib_training.model.networks import vae as our_vae

th = torch


class ResBlock(ours.ResBlock):
    use_checkpoint = False

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)


def reclass(root, mapping):
    """Give every module of an exact class in `mapping` the mapped class (same parameters, new methods)."""
    for module in root.modules():
        cls = mapping.get(type(module))
        if cls is not None:
            module.__class__ = cls


class UNetModel(ours.UNetModel):
    calls = 0
    fail_at_call = None  # a test sets it to make the n-th call raise (an injected failure)

    def __init__(self, config):
        super().__init__(config)
        self.in_channels = config.in_channels
        self.num_classes = "sequential" if config.adm_in_channels is not None else None
        reclass(self, self.block_classes())

    @staticmethod
    def block_classes():
        return {
            our_attention.CrossAttention: ldm.modules.attention.CrossAttention,
            our_attention.BasicTransformerBlock: ldm.modules.attention.BasicTransformerBlock,
            ours.ResBlock: ResBlock,
        }

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        assert (y is not None) == (self.num_classes is not None)
        type(self).calls += 1
        if self.fail_at_call is not None and type(self).calls >= self.fail_at_call:
            raise RuntimeError("injected failure in the UNet")
        return super().forward(x, timesteps, context, y).type(x.dtype)


VAE_CLASSES = {our_vae.AttnBlock: ldm.modules.diffusionmodules.model.AttnBlock}
