"""Stand-in for `modules.extra_networks_hypernet`: the hosts' own `hypernet` extra network, which loads
the named hypernetworks into `shared.loaded_hypernetworks` (A1111's attention applies them from there;
Forge's never does)."""

from modules import extra_networks
from modules.hypernetworks import hypernetwork


class ExtraNetworkHypernet(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("hypernet")

    def activate(self, p, params_list):
        names = [params.items[0] for params in params_list]
        multipliers = [float(params.items[1]) if len(params.items) > 1 else 1.0 for params in params_list]
        hypernetwork.load_hypernetworks(names, multipliers)

    def deactivate(self, p):
        pass
