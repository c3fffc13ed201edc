"""The training core: one loop that every method (embedding, hypernetwork, LoRA, ...) shares."""
