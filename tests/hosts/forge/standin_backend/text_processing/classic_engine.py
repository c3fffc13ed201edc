"""Stand-in for Forge's `ClassicTextProcessingEngine`: tokenizing and the layer choice of one text
encoder; its constructor wraps the token embedding for textual inversion, as Forge's does."""

import torch
from backend.text_processing.textual_inversion import EmbeddingDatabase


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight  # the same Parameter, registered under a second name

    def forward(self, input_ids):
        fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        if fixes:
            raise NotImplementedError("the stand-in does not splice embeddings")
        return self.wrapped(input_ids)


class ClassicTextProcessingEngine:
    def __init__(
        self,
        text_encoder,
        tokenizer,
        chunk_length=75,
        embedding_dir=None,
        embedding_key="clip_l",
        embedding_expected_shape=768,
        emphasis_name="Original",
        text_projection=False,
        minimal_clip_skip=1,
        clip_skip=1,
        return_pooled=False,
        final_layer_norm=True,
    ):
        self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)
        if isinstance(embedding_dir, str):
            self.embeddings.add_embedding_dir(embedding_dir)
            self.embeddings.load_textual_inversion_embeddings()
        self.embedding_key = embedding_key
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_projection = text_projection
        self.minimal_clip_skip = minimal_clip_skip
        self.clip_skip = clip_skip
        self.return_pooled = return_pooled
        self.final_layer_norm = final_layer_norm
        self.chunk_length = chunk_length
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id
        embeddings = text_encoder.transformer.text_model.embeddings
        embeddings.token_embedding = CLIPEmbeddingForTextualInversion(
            embeddings.token_embedding, self.embeddings, textual_inversion_key=embedding_key
        )

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        """One chunk [B][77] -> [B, 77, C] (`.pooled` when the engine returns it), without emphasis."""
        tokens = torch.asarray(remade_batch_tokens)
        if self.id_end != self.id_pad:
            for row in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[row].index(self.id_end)
                tokens[row, index + 1 :] = self.id_pad
        return self.encode_with_transformers(tokens)

    def encode_with_transformers(self, tokens):
        transformer = self.text_encoder.transformer
        outputs = transformer(input_ids=tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = transformer.text_model.final_layer_norm(z)
        if self.return_pooled:
            pooled = outputs.pooler_output
            z.pooled = transformer.text_projection(pooled) if self.text_projection else pooled
        return z
