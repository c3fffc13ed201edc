"""Stand-in for A1111's `modules.textual_inversion.textual_inversion.EmbeddingDatabase`: embeddings by
name from the registered folders (searched recursively, as the host does)."""

import os


class EmbeddingDatabase:
    def __init__(self):
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.embedding_dirs = {}
        self.expected_shape = -1
        self.reloads = 0

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def register_embedding(self, embedding, model):
        self.word_embeddings[embedding.name] = embedding
        return embedding

    def load_textual_inversion_embeddings(self, force_reload=False):
        self.reloads += 1
        self.word_embeddings.clear()
        for folder in self.embedding_dirs:
            for root, _, files in os.walk(folder):
                for name in files:
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in (".pt", ".safetensors", ".bin"):
                        self.word_embeddings[stem] = os.path.join(root, name)
