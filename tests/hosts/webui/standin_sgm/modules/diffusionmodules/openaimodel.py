"""Stand-in for sgm's `openaimodel`."""

import sgm.modules.attention
import sgm.modules.diffusionmodules.model
import torch
from ldm.modules.diffusionmodules import openaimodel as ldm_openaimodel
from ldm.modules.diffusionmodules.util import checkpoint

from lib_training.model.networks import attention as our_attention
from lib_training.model.networks import unet as ours
from lib_training.model.networks import vae as our_vae

th = torch


class ResBlock(ours.ResBlock):
    use_checkpoint = False

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)


class UNetModel(ldm_openaimodel.UNetModel):
    @staticmethod
    def block_classes():
        return {
            our_attention.CrossAttention: sgm.modules.attention.CrossAttention,
            our_attention.BasicTransformerBlock: sgm.modules.attention.BasicTransformerBlock,
            ours.ResBlock: ResBlock,
        }


VAE_CLASSES = {our_vae.AttnBlock: sgm.modules.diffusionmodules.model.AttnBlock}
