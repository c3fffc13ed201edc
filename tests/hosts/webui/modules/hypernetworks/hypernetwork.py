"""Stand-in for `modules.hypernetworks.hypernetwork`: the attention forward that applies the loaded
hypernetworks (what `undo_optimizations()` installs), and a hypernetwork that counts its uses."""

from modules import shared


class Hypernetwork:
    def __init__(self, name, strength=0.1):
        self.name = name
        self.strength = strength
        self.calls = 0

    def __call__(self, context):
        self.calls += 1
        return context * (1.0 + self.strength)


def attention_CrossAttention_forward(self, x, context=None, mask=None, **kwargs):  # noqa: N802 (the host's name)
    import ldm.modules.attention

    context = x if context is None else context
    for hypernetwork in shared.loaded_hypernetworks:
        context = hypernetwork(context)
    return ldm.modules.attention.cross_attention_forward(self, x, context)


def load_hypernetworks(names, multipliers=None):
    """The named hypernetworks that are in `shared.hypernetworks`, at their multipliers, as the loaded ones."""
    shared.loaded_hypernetworks.clear()
    for i, name in enumerate(names):
        if name in shared.hypernetworks:
            shared.loaded_hypernetworks.append(Hypernetwork(name, multipliers[i] if multipliers else 1.0))
