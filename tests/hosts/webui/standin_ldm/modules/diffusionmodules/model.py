"""Stand-in for `diffusionmodules.model` (the VAE's blocks): `nonlinearity` and `AttnBlock`."""

import torch

from lib_training.model.networks import vae as ours


def nonlinearity(x):
    return x * torch.sigmoid(x)


def attn_block_forward(self, x):
    return ours.AttnBlock.forward(self, x)


class AttnBlock(ours.AttnBlock):
    forward = attn_block_forward
