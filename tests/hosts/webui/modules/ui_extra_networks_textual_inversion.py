"""Stand-in for Forge's `modules.ui_extra_networks_textual_inversion`: the Textual Inversion cards' database."""

import os

from modules import shared


class _CardsDatabase:
    def __init__(self):
        self.word_embeddings = {}
        self.reloads = 0

    def load_textual_inversion_embeddings(self, force_reload=False, sync_with_sd_model=True):
        self.reloads += 1
        self.word_embeddings.clear()
        for root, _, files in os.walk(shared.cmd_opts.embeddings_dir):
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext.lower() in (".pt", ".safetensors"):
                    self.word_embeddings[stem] = os.path.join(root, name)


embedding_db = _CardsDatabase()
