"""Stand-in for A1111's `modules.sd_hijack_clip`: the prompt-handling wrappers around CLIP-L.

`process_tokens` encodes one chunk of token lists [B][77] as A1111's does, without emphasis (the
stand-in's prompts have none: every multiplier is 1, where "Original" emphasis is the identity).
"""

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

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        tokens = torch.asarray(remade_batch_tokens)
        if self.id_end != self.id_pad:
            for row in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[row].index(self.id_end)
                tokens[row, index + 1 :] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        z = z * 1.0  # where A1111 applies the emphasis multipliers (all 1 here)
        if pooled is not None:
            z.pooled = pooled
        return z

    def encode_with_transformers(self, tokens):
        from modules import shared

        skip = shared.opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state

    def encode_embedding_init_text(self, init_text, nvpt):
        embedding = self.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
        ids = torch.tensor(self.tokenize([init_text])[0][:nvpt], device=embedding.weight.device)
        return embedding(ids)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]
