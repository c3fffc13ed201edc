"""Stand-in for `modules.extra_networks`: the registry of prompt tags `<name:arg1:arg2>`, their parsing
and the activate / deactivate calls around a generation (A1111 1.10 and Forge alike)."""

import re
from collections import defaultdict

from modules import errors

extra_network_registry = {}
extra_network_aliases = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_default_extra_networks():
    from modules.extra_networks_hypernet import ExtraNetworkHypernet

    register_extra_network(ExtraNetworkHypernet())


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data):
    """{extra network: its params} for the tags found; unknown tag names are skipped (and logged)."""
    found = {}
    for name, params in extra_network_data.items():
        extra_network = extra_network_registry.get(name) or extra_network_aliases.get(name)
        if extra_network is None:
            errors.reported.append(f"Skipping unknown extra network: {name}")
            continue
        found.setdefault(extra_network, []).extend(params)
    return found


def activate(p, extra_network_data):
    """Each extra network named in the prompts gets its params, every other registered one an empty list;
    a failure is displayed and the generation goes on."""
    activated = []
    for extra_network, params in lookup_extra_networks(extra_network_data).items():
        try:
            extra_network.activate(p, params)
            activated.append(extra_network)
        except Exception as e:
            errors.display(e, f"activating extra network {extra_network.name} with arguments {params}")
    for name, extra_network in extra_network_registry.items():
        if extra_network in activated:
            continue
        try:
            extra_network.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {name}")


def deactivate(p, extra_network_data):
    for extra_network in list(extra_network_registry.values()):
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {extra_network.name}")


def parse_prompt(prompt):
    found = defaultdict(list)

    def take(match):
        found[match.group(1)].append(ExtraNetworkParams(items=match.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, take, prompt), found


def parse_prompts(prompts):
    cleaned, data = [], None
    for prompt in prompts:
        text, found = parse_prompt(prompt)
        if data is None:
            data = found
        cleaned.append(text)
    return cleaned, data
