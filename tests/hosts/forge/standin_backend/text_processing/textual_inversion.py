"""Stand-in for Forge's prompt-side `EmbeddingDatabase` (one per text-processing engine)."""

import os


class EmbeddingDatabase:
    def __init__(self, tokenizer, expected_shape=-1):
        self.tokenizer = tokenizer
        self.expected_shape = expected_shape
        self.word_embeddings = {}
        self.embedding_dirs = {}
        self.fixes = []
        self.reloads = 0

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def load_textual_inversion_embeddings(self):
        self.reloads += 1
        self.word_embeddings.clear()
        for folder in self.embedding_dirs:
            for root, _, files in os.walk(folder):
                for name in files:
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in (".pt", ".safetensors"):
                        self.word_embeddings[stem] = os.path.join(root, name)
