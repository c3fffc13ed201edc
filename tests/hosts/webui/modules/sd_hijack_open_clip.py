"""Stand-in for A1111's `modules.sd_hijack_open_clip`: the prompt-handling wrappers around OpenCLIP."""

import torch

from lib_training.model.networks.tokenizer import _bpe
from modules import sd_hijack_clip

tokenizer = _bpe()  # the host uses open_clip's module-level SimpleTokenizer


class FrozenOpenCLIPEmbedderWithCustomWords(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

    process_tokens = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords.process_tokens

    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)

    def encode_embedding_init_text(self, init_text, nvpt):
        embedding = self.wrapped.model.token_embedding.wrapped
        return embedding(torch.tensor(self.tokenize([init_text])[0][:nvpt], device=embedding.weight.device))


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenOpenCLIPEmbedderWithCustomWords):
    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        z.pooled = d["pooled"]
        return z
