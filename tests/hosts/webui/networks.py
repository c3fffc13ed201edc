"""Stand-in for A1111's built-in Lora extension (`extensions-builtin/Lora/networks.py`, module `networks`).

Selected networks (`loaded_networks`) are merged into a layer's weight in place at forward time
(`network_apply_weights`), after a CPU backup of the original weight; a layer remembers which
networks it holds (`network_current_names`). A stand-in network adds a fixed delta per layer name.
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


def assign_network_names(sd_model):
    for name, module in sd_model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.network_layer_name = name.replace(".", "_")


def network_restore_weights_from_backup(self):
    backup = getattr(self, "network_weights_backup", None)
    if backup is not None:
        self.weight.copy_(backup)


def network_apply_weights(self):
    name = getattr(self, "network_layer_name", None)
    if name is None:
        return
    current = getattr(self, "network_current_names", ())
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    if getattr(self, "network_weights_backup", None) is None and wanted != ():
        self.network_weights_backup = self.weight.to("cpu", copy=True)
    if current != wanted:
        network_restore_weights_from_backup(self)
        for network in loaded_networks:
            delta = network.deltas.get(name)
            if delta is not None:
                with torch.no_grad():
                    self.weight.copy_(self.weight + network.unet_multiplier * delta.to(self.weight))
        self.network_current_names = wanted


def list_available_networks():
    global list_calls
    list_calls += 1
