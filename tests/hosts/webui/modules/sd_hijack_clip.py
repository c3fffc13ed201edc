"""Stand-in for A1111's `modules.sd_hijack_clip`: the prompt-handling wrappers around CLIP-L."""

import torch


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.tokenizer = wrapped.tokenizer
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = self.id_end
        self.return_pooled = getattr(wrapped, "return_pooled", False)

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_embedding_init_text(self, init_text, nvpt):
        embedding = self.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
        ids = torch.tensor(self.tokenize([init_text])[0][:nvpt], device=embedding.weight.device)
        return embedding(ids)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    pass
