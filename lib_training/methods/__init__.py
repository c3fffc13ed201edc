"""Training methods: each module says what trains, how it attaches to the model, and how it saves."""
