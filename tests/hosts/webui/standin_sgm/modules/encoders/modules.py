"""Stand-in for `sgm.modules.encoders.modules`: SDXL's conditioner and its two text encoders."""

import torch
from ldm.modules.encoders.modules import FrozenCLIPEmbedder as _LdmCLIPEmbedder
from ldm.modules.encoders.modules import _sequence_first


class FrozenCLIPEmbedder(_LdmCLIPEmbedder):
    """SDXL's CLIP-L: `layer="hidden"`, conditioned on `hidden_states[layer_idx]`."""


class FrozenOpenCLIPEmbedder2(torch.nn.Module):
    """SDXL's bigG (legacy=False): `encode_with_transformer` returns {"penultimate", "last", "pooled"}."""

    def __init__(self, model, layer="penultimate"):
        super().__init__()
        self.model = model
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        self.legacy = False
        self.return_pooled = True
        self.freeze()

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)
        x = x + self.model.positional_embedding
        out = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        last = self.model.ln_final(out["last"])
        out["pooled"] = last[torch.arange(last.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection
        return out

    def text_transformer_forward(self, x, attn_mask=None):
        first = _sequence_first(self.model)
        if first:
            x = x.permute(1, 0, 2)
        outputs = {}
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2) if first else x
            x = block(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2) if first else x
        return outputs


class ConcatTimestepEmbedderND(torch.nn.Module):
    def __init__(self, outdim=256):
        super().__init__()
        self.outdim = outdim


class GeneralConditioner(torch.nn.Module):
    def __init__(self, embedders):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)
