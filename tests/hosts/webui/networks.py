"""Stand-in for A1111's built-in Lora extension (`extensions-builtin/Lora/networks.py`, module `networks`).

Selected networks (`loaded_networks`) are merged into a layer's weight in place at forward time
(`network_apply_weights`), after a CPU backup of the original weight; a layer remembers which
networks it holds (`network_current_names`). A stand-in network adds a fixed delta per layer name.
As in the WebUI, every submodule of the UNet and text encoders gets a `network_layer_name`
(containers too), but only the layers whose class `forward` the extension patches merge, when they
run (`generate`); merging into a module without a weight fails as it does there.
"""

import torch

loaded_networks = []
list_calls = 0


class Network:
    def __init__(self, name, deltas, te_multiplier=1.0, unet_multiplier=1.0):
        self.name = name
        self.deltas = deltas  # layer name -> tensor shaped like that layer's weight
        self.te_multiplier = te_multiplier
        self.unet_multiplier = unet_multiplier
        self.dyn_dim = None


# The layer classes whose `forward` the Lora extension patches to merge the selected networks.
PATCHED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)


def assign_network_names(sd_model):
    """`assign_network_names_to_compvis_modules`: a name for every submodule of the text encoders
    (SDXL: of each embedder with a `wrapped` model, prefixed by its index) and of `sd_model.model`."""
    if getattr(sd_model, "is_sdxl", False):
        roots = [(f"{i}_", e.wrapped) for i, e in enumerate(sd_model.conditioner.embedders) if hasattr(e, "wrapped")]
    else:
        roots = [("", getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model))]
    roots.append(("", sd_model.model))
    for prefix, root in roots:
        for name, module in root.named_modules():
            module.network_layer_name = prefix + name.replace(".", "_")


def generate(sd_model, selected):
    """What a generation with these networks selected does to the weights: each patched layer that
    runs merges them (under no_grad). A MultiheadAttention uses its `out_proj` weights itself."""
    loaded_networks[:] = selected
    layers = [m for m in sd_model.modules() if isinstance(m, PATCHED_LAYERS)]
    inner = {id(m.out_proj) for m in layers if isinstance(m, torch.nn.MultiheadAttention)}
    with torch.no_grad():
        for layer in layers:
            if id(layer) not in inner:
                network_apply_weights(layer)


def _weights(layer):
    """The weights a layer merges into: a MultiheadAttention's in_proj and out_proj, else its own."""
    if isinstance(layer, torch.nn.MultiheadAttention):
        return [layer.in_proj_weight, layer.out_proj.weight]
    return [layer.weight]


def network_restore_weights_from_backup(self):
    backup = getattr(self, "network_weights_backup", None)
    if backup is not None:
        for weight, saved in zip(_weights(self), backup):
            weight.copy_(saved)


def network_apply_weights(self):
    name = getattr(self, "network_layer_name", None)
    if name is None:
        return
    current = getattr(self, "network_current_names", ())
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    if getattr(self, "network_weights_backup", None) is None and wanted != ():
        self.network_weights_backup = [w.to("cpu", copy=True) for w in _weights(self)]  # no weight: AttributeError
    if current != wanted:
        network_restore_weights_from_backup(self)
        for network in loaded_networks:
            delta = network.deltas.get(name)
            if delta is not None:
                weight = _weights(self)[0]
                with torch.no_grad():
                    weight.copy_(weight + network.unet_multiplier * delta.to(weight))
        self.network_current_names = wanted


def list_available_networks():
    global list_calls
    list_calls += 1
