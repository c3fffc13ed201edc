"""Stand-in for Forge's `modules.api.api.Api`: the HTTP API object keeps an embedding database of its
own, loaded when the API is created and by POST /sdapi/v1/refresh-embeddings; GET /sdapi/v1/embeddings
lists that database (a method of the object is the route's endpoint)."""

import os

from modules import shared


class _EmbeddingDatabase:
    def __init__(self, folder):
        self.folder = folder
        self.word_embeddings = {}
        self.skipped_embeddings = {}

    def load_textual_inversion_embeddings(self, force_reload=False, sync_with_sd_model=True):
        self.word_embeddings.clear()
        for root, _, files in os.walk(self.folder):
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext.lower() in (".pt", ".safetensors"):
                    self.word_embeddings[stem] = os.path.join(root, name)


class Api:
    def __init__(self, app, queue_lock):
        self.app = app
        self.queue_lock = queue_lock
        self.embedding_db = _EmbeddingDatabase(shared.cmd_opts.embeddings_dir)
        self.embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
        app.add_api_route("/sdapi/v1/embeddings", self.get_embeddings, methods=["GET"])
        app.add_api_route("/sdapi/v1/refresh-embeddings", self.refresh_embeddings, methods=["POST"])

    def get_embeddings(self):
        return {"loaded": {name: {} for name in self.embedding_db.word_embeddings}, "skipped": {}}

    def refresh_embeddings(self):
        with self.queue_lock:
            self.embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
