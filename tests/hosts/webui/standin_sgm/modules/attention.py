"""Stand-in for `sgm.modules.attention` (classes distinct from ldm's, as in A1111)."""

from ldm.modules.diffusionmodules.util import checkpoint

from lib_training.model.networks import attention as ours


def cross_attention_forward(
    self, x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0
):
    return ours.CrossAttention.forward(self, x, context)


class CrossAttention(ours.CrossAttention):
    forward = cross_attention_forward


class BasicTransformerBlock(ours.BasicTransformerBlock):
    checkpoint = False

    def forward(self, x, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        return ours.BasicTransformerBlock.forward(self, x, context)
