"""Stand-in for Forge's `backend.nn.unet`: our UNet with Forge's block classes and call signatures,
including what training must work around: `checkpoint()` that raises when enabled, and residual
adds in place in `BasicTransformerBlock._forward` (after LayerNorms that saved their input); and
Forge's attention patches from `transformer_options["patches"]` (`attn1_patch`, `attn2_patch`:
`p(n, context, value, extra_options) -> (n, context, value)` before the projections, k from
`context` and v from `value`).

Forge hands `transformer_options` down through its TimestepEmbedSequential and SpatialTransformer;
ours do not take them, so the UNet's forward hands them to its transformer blocks through a context
variable (a block called with options of its own uses those)."""

import contextvars

import torch.nn.functional as F

from lib_training.model.networks import attention as our_attention
from lib_training.model.networks import unet as ours

_OPTIONS = contextvars.ContextVar("transformer_options", default=None)


def checkpoint(f, args, parameters, enable=False):
    if enable:
        raise NotImplementedError("Gradient Checkpointing is not implemented.")
    return f(*args)


class CrossAttention(our_attention.CrossAttention):
    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (as Forge)
        if value is None:
            return our_attention.CrossAttention.forward(self, x, context)
        heads = self.heads
        context = x if context is None else context
        q = self.to_q(x).view(*x.shape[:-1], heads, -1).transpose(1, 2)
        k = self.to_k(context).view(*context.shape[:-1], heads, -1).transpose(1, 2)
        v = self.to_v(value).view(*value.shape[:-1], heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return our_attention.run_sequential(self.to_out, out.transpose(1, 2).reshape(*x.shape[:-1], -1))


class BasicTransformerBlock(our_attention.BasicTransformerBlock):
    ff_in = False
    is_res = True
    disable_self_attn = False
    checkpoint = False

    def forward(self, x, context=None, transformer_options=None):
        options = (_OPTIONS.get() or {}) if transformer_options is None else transformer_options
        return checkpoint(self._forward, (x, context, options), None, self.checkpoint)

    def _forward(self, x, context=None, transformer_options={}):  # noqa: B006
        patches = transformer_options.get("patches", {})
        extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        n = self.norm1(x)
        context_attn1 = context if self.disable_self_attn else None
        value_attn1 = None
        if "attn1_patch" in patches:
            context_attn1 = n if context_attn1 is None else context_attn1
            value_attn1 = context_attn1
            for patch in patches["attn1_patch"]:
                n, context_attn1, value_attn1 = patch(n, context_attn1, value_attn1, extra)
        n = self.attn1(n, context=context_attn1, value=value_attn1, transformer_options=extra)
        x += n
        n = self.norm2(x)
        context_attn2, value_attn2 = context, None
        if "attn2_patch" in patches:
            value_attn2 = context_attn2
            for patch in patches["attn2_patch"]:
                n, context_attn2, value_attn2 = patch(n, context_attn2, value_attn2, extra)
        n = self.attn2(n, context=context_attn2, value=value_attn2, transformer_options=extra)
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
        token = _OPTIONS.set(transformer_options)
        try:
            return super().forward(x, timesteps, context, y).type(x.dtype)
        finally:
            _OPTIONS.reset(token)
