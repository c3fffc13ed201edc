"""Stand-in for `ldm.modules.attention`: our blocks under ldm's class names and call signatures."""

from ldm.modules.diffusionmodules.util import checkpoint

from lib_training.model.networks import attention as ours


def cross_attention_forward(self, x, context=None, mask=None, **kwargs):
    return ours.CrossAttention.forward(self, x, context)


class CrossAttention(ours.CrossAttention):
    forward = cross_attention_forward


class BasicTransformerBlock(ours.BasicTransformerBlock):
    checkpoint = False

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x, context=None):
        return ours.BasicTransformerBlock.forward(self, x, context)
