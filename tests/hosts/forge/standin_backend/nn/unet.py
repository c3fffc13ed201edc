"""Stand-in for Forge's `backend.nn.unet`: our UNet with Forge's block classes and call signatures,
including what training must work around: `checkpoint()` that raises when enabled, and residual
adds in place in `BasicTransformerBlock._forward` (after LayerNorms that saved their input)."""

from lib_training.model.networks import attention as our_attention
from lib_training.model.networks import unet as ours


def checkpoint(f, args, parameters, enable=False):
    if enable:
        raise NotImplementedError("Gradient Checkpointing is not implemented.")
    return f(*args)


class CrossAttention(our_attention.CrossAttention):
    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (as Forge)
        return our_attention.CrossAttention.forward(self, x, context)


class BasicTransformerBlock(our_attention.BasicTransformerBlock):
    ff_in = False
    is_res = True
    disable_self_attn = False
    checkpoint = False

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        return checkpoint(self._forward, (x, context, transformer_options), None, self.checkpoint)

    def _forward(self, x, context=None, transformer_options={}):  # noqa: B006
        n = self.norm1(x)
        n = self.attn1(n, context=context if self.disable_self_attn else None, transformer_options=transformer_options)
        x += n
        n = self.norm2(x)
        n = self.attn2(n, context=context, transformer_options=transformer_options)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class ResBlock(ours.ResBlock):
    use_checkpoint = False
    use_scale_shift_norm = False

    def forward(self, x, emb, transformer_options={}):  # noqa: B006
        return checkpoint(self._forward, (x, emb, transformer_options), None, self.use_checkpoint)

    def _forward(self, x, emb, transformer_options={}):  # noqa: B006
        return ours.ResBlock._forward(self, x, emb)


_CLASSES = {
    our_attention.CrossAttention: CrossAttention,
    our_attention.BasicTransformerBlock: BasicTransformerBlock,
    ours.ResBlock: ResBlock,
}


class IntegratedUNet2DConditionModel(ours.UNetModel):
    calls = 0
    fail_at_call = None  # a test sets it to make the n-th call raise (an injected failure)

    def __init__(self, config):
        super().__init__(config)
        self.num_classes = "sequential" if config.adm_in_channels is not None else None
        for module in self.modules():
            cls = _CLASSES.get(type(module))
            if cls is not None:
                module.__class__ = cls

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        assert (y is not None) == (self.num_classes is not None)
        type(self).calls += 1
        if self.fail_at_call is not None and type(self).calls >= self.fail_at_call:
            raise RuntimeError("injected failure in the UNet")
        return super().forward(x, timesteps, context, y).type(x.dtype)
