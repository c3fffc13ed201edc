"""Stand-in for `ldm.modules.encoders.modules`: the SD1 (HF CLIP-L) and SD2 (OpenCLIP) text encoders."""

import torch


class FrozenCLIPEmbedder(torch.nn.Module):
    """`.tokenizer` (HF-like), `.transformer` (HF `CLIPTextModel`)."""

    def __init__(self, tokenizer, transformer, layer="last", layer_idx=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.layer = layer
        self.layer_idx = layer_idx
        self.freeze()

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False


def _sequence_first(model):
    return not getattr(model.transformer.resblocks[0].attn, "batch_first", False)


class FrozenOpenCLIPEmbedder(torch.nn.Module):
    """`.model`: an open_clip text tower (`token_embedding`, `positional_embedding`, `transformer`,
    `ln_final`, `attn_mask`); conditions on layer "last" or "penultimate", then ln_final."""

    def __init__(self, model, layer="penultimate"):
        super().__init__()
        self.model = model
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        self.freeze()

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)  # [B, 77, W]
        x = x + self.model.positional_embedding
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        return self.model.ln_final(x)

    def text_transformer_forward(self, x, attn_mask=None):
        first = _sequence_first(self.model)
        if first:
            x = x.permute(1, 0, 2)
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - self.layer_idx:
                break
            x = block(x, attn_mask=attn_mask)
        return x.permute(1, 0, 2) if first else x
