"""Hypernetwork files and modules: A1111's keys, nesting and types; its numerics; clear errors.

The A1111 side is written here from the format's description (formats.md, "Hypernetworks"), not
from lib_training: the positions of each layer in the Sequential, the dict A1111 pickles, and the
forward as a formula.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_pt_format import assert_webui_opens

from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.hypernetwork_file import (
    optim_path,
    read_hypernetwork,
    read_optimizer_state,
    write_optimizer_state,
)
from lib_training.formats.pt_format import webui_pt_problems
from lib_training.methods.hypernetwork import HypernetworkConfig, HypernetworkMethod, modules_from_file, new_modules
from lib_training.methods.hypernetwork_net import HypernetworkModule, Structure

A1111_KEYS = [
    "step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "sd_checkpoint",
    "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info",
]  # fmt: skip


def a1111_sequential(dim, layers, activation=None, layer_norm=False, dropout=None, activate_output=False):
    """A1111's stack, written from the spec: Linear; activation (not after the last Linear unless
    activate_output); LayerNorm when enabled; Dropout(p) when the structure's next entry is > 0."""
    acts = {"relu": torch.nn.ReLU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU}
    dropout = dropout or [0] * len(layers)
    out = []
    for i in range(len(layers) - 1):
        out.append(torch.nn.Linear(int(dim * layers[i]), int(dim * layers[i + 1])))
        if activation not in (None, "linear") and (i < len(layers) - 2 or activate_output):
            out.append(acts[activation]())
        if layer_norm:
            out.append(torch.nn.LayerNorm(int(dim * layers[i + 1])))
        if dropout[i + 1] > 0:
            out.append(torch.nn.Dropout(dropout[i + 1]))
    return torch.nn.Sequential(*out)


class A1111Module(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.linear = a1111_sequential(*args, **kwargs)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.2)


def a1111_file(tmp_path: Path, widths=(8, 4), **settings) -> tuple[Path, dict]:
    """A file as A1111's save writes it (plain torch.save of its dict), with random weights."""
    layers = settings.get("layers", [1, 2, 1])
    kwargs = {k: v for k, v in settings.items() if k != "layers"}
    modules = {w: (A1111Module(w, layers, **kwargs), A1111Module(w, layers, **kwargs)) for w in widths}
    data = {w: (k.state_dict(), v.state_dict()) for w, (k, v) in modules.items()}
    data.update(
        step=42, name="old", layer_structure=[float(x) for x in layers], activation_func=kwargs.get("activation"),
        is_layer_norm=kwargs.get("layer_norm", False), weight_initialization="Normal", sd_checkpoint="abcdef1234",
        sd_checkpoint_name="model", activate_output=kwargs.get("activate_output", False),
        use_dropout=bool(kwargs.get("dropout")), dropout_structure=kwargs.get("dropout") or [0] * len(layers),
        last_layer_dropout=False, optional_info=None,
    )  # fmt: skip
    path = tmp_path / "old.pt"
    torch.save(data, path)
    return path, modules


def _ours(tmp_path: Path, **changes) -> Path:
    method = HypernetworkMethod(HypernetworkConfig(name="hn", **changes))
    method.structure = method.settings.structure()
    method.modules = new_modules(method.structure, [8, 4], seed=1)
    path = tmp_path / "hn.pt"
    method.save(path, 7, {"sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"})
    return path


# --- the file -----------------------------------------------------------------------------------------


def test_our_file_has_exactly_a1111s_keys_nesting_and_types(tmp_path) -> None:
    path = _ours(tmp_path, layer_structure="1, 2, 1", activation="relu", layer_norm=True, dropout="0, 0.3, 0")
    data = torch.load(path, weights_only=True)
    assert type(data) is dict
    assert list(data) == [8, 4, *A1111_KEYS]
    for width in (8, 4):
        pair = data[width]
        assert type(pair) is tuple and len(pair) == 2
        reference = A1111Module(width, [1, 2, 1], "relu", True, [0, 0.3, 0]).state_dict()
        for state in pair:
            assert type(state) is collections.OrderedDict
            assert list(state) == list(reference)  # linear.0, linear.2 (LayerNorm), linear.4, linear.5
            assert all(state[k].shape == reference[k].shape and state[k].dtype == torch.float32 for k in state)
    assert data["layer_structure"] == [1.0, 2.0, 1.0] and all(type(x) is float for x in data["layer_structure"])
    assert data["dropout_structure"] == [0.0, 0.3, 0.0]
    assert (data["activation_func"], data["is_layer_norm"], data["use_dropout"]) == ("relu", True, True)
    assert (data["step"], data["name"], data["weight_initialization"]) == (7, "hn", "Normal")
    assert (data["sd_checkpoint"], data["sd_checkpoint_name"]) == ("0123456789", "tiny")
    assert data["last_layer_dropout"] is True and data["activate_output"] is False
    assert data["optional_info"] is None


def test_our_file_passes_a1111s_safe_unpickler_rules(tmp_path) -> None:
    path = _ours(tmp_path, layer_structure="1, 1.5, 1.5, 1", activation="elu", layer_norm=True, dropout="default")
    assert_webui_opens(path)
    with __import__("zipfile").ZipFile(path) as archive:
        assert not any(name.endswith(".format_version") for name in archive.namelist())


@pytest.mark.parametrize("activation", ["relu", "swish", "tanh", "linear"])
def test_a1111_file_loads_and_gives_the_same_outputs(tmp_path, activation) -> None:
    settings = {"activation": activation, "layer_norm": True, "dropout": [0, 0.3, 0]}
    path, reference = a1111_file(tmp_path, **settings)
    loaded = read_hypernetwork(path)
    assert (loaded.step, loaded.name, loaded.sd_checkpoint) == (42, "old", "abcdef1234")
    _, modules = modules_from_file(loaded)
    x = torch.randn(2, 5, 8)
    for ours, theirs in zip(modules[8], reference[8]):
        theirs.eval()
        assert torch.allclose(ours(x, strength=0.7), x + theirs.linear(x) * 0.7, atol=1e-6)


def test_legacy_key_names_and_missing_settings_get_a1111s_defaults(tmp_path) -> None:
    """The first hypernetworks: `linear1.*` / `linear2.*`, no settings (so 1, 2, 1 without activation)."""

    def pair():
        return {"linear1.weight": torch.randn(16, 8), "linear1.bias": torch.randn(16),
                "linear2.weight": torch.randn(8, 16), "linear2.bias": torch.randn(8)}  # fmt: skip

    legacy = {8: (pair(), pair())}
    torch.save(legacy, tmp_path / "nai.pt")
    loaded = read_hypernetwork(tmp_path / "nai.pt")
    assert loaded.layer_structure == [1.0, 2.0, 1.0] and loaded.activation_func is None
    assert loaded.activate_output is True and loaded.dropout_structure == [0.0, 0.0, 0.0]
    assert loaded.name == "nai" and loaded.step == 0
    _, modules = modules_from_file(loaded)
    x = torch.randn(3, 8)
    k = legacy[8][0]
    expected = x + (x @ k["linear1.weight"].T + k["linear1.bias"]) @ k["linear2.weight"].T + k["linear2.bias"]
    assert torch.allclose(modules[8][0](x), expected, atol=1e-5)


def test_use_dropout_without_a_structure_is_a1111s_default_structure(tmp_path) -> None:
    path, _ = a1111_file(tmp_path, layers=[1, 2, 2, 1])
    data = torch.load(path, weights_only=True)
    data.pop("dropout_structure")
    data.update(use_dropout=True, last_layer_dropout=True)
    torch.save(data, path)
    assert read_hypernetwork(path).dropout_structure == [0.0, 0.3, 0.3, 0.0]


def test_round_trip_keeps_weights_and_settings(tmp_path) -> None:
    path = _ours(tmp_path, layer_structure="1, 2, 1", activation="relu", activate_output=True)
    loaded = read_hypernetwork(path)
    structure, modules = modules_from_file(loaded)
    assert structure == Structure((1.0, 2.0, 1.0), "relu", "Normal", False, (0.0, 0.0, 0.0), True)
    written = torch.load(path, weights_only=True)
    assert torch.equal(modules[4][1].state_dict()["linear.2.weight"], written[4][1]["linear.2.weight"])


def test_files_that_are_not_hypernetworks_are_refused(tmp_path) -> None:
    torch.save({"string_to_param": {"*": torch.randn(1, 8)}}, tmp_path / "emb.pt")
    with pytest.raises(CheckpointError, match="no hypernetwork modules"):
        read_hypernetwork(tmp_path / "emb.pt")
    with pytest.raises(CheckpointError, match="no hypernetwork file"):
        read_hypernetwork(tmp_path / "missing.pt")


def test_optimizer_state_is_written_beside_the_file_and_tied_to_it(tmp_path) -> None:
    path = _ours(tmp_path)
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones(3)
    optimizer.step()
    write_optimizer_state(path, optimizer.state_dict())
    assert optim_path(path).name == "hn.pt.optim"
    assert not webui_pt_problems(optim_path(path).read_bytes())
    record = torch.load(optim_path(path), weights_only=True)
    assert set(record) == {"optimizer_name", "hash", "optimizer_state_dict"} and record["optimizer_name"] == "AdamW"
    name, state = read_optimizer_state(path)
    assert name == "AdamW"
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    path.write_bytes(path.read_bytes() + b"\0")  # the file changed: its old optimizer state no longer applies
    assert read_optimizer_state(path) is None


# --- numerics -------------------------------------------------------------------------------------------


def test_forward_is_x_plus_the_mlp_times_the_strength() -> None:
    structure = Structure((1.0, 2.0, 1.0), "relu", "Normal", True, (0.0, 0.0, 0.0), False)
    module = HypernetworkModule(8, structure)
    for p in module.parameters():
        torch.nn.init.normal_(p)
    module.eval()
    s = module.linear.state_dict()
    x = torch.randn(2, 3, 8)
    h = F.layer_norm(torch.relu(x @ s["0.weight"].T + s["0.bias"]), (16,), s["2.weight"], s["2.bias"])
    h = F.layer_norm(h @ s["3.weight"].T + s["3.bias"], (8,), s["4.weight"], s["4.bias"])
    assert torch.allclose(module(x, strength=0.3), x + 0.3 * h, atol=1e-5)
    module.train()
    assert torch.allclose(module(x, strength=0.3), x + h, atol=1e-5)  # training ignores the strength, as A1111


def test_strength_zero_leaves_the_input_identical() -> None:
    module = new_modules(Structure(activation="relu"), [8], seed=0)[8][0]
    x = torch.randn(4, 8)
    assert torch.equal(module(x, strength=0.0), x)


@pytest.mark.parametrize(
    ("layer_norm", "dropout", "activate_output", "expected"),
    [
        (False, (0, 0, 0), False, ["Linear", "ReLU", "Linear"]),
        (True, (0, 0, 0), False, ["Linear", "ReLU", "LayerNorm", "Linear", "LayerNorm"]),
        (False, (0, 0.3, 0), True, ["Linear", "ReLU", "Dropout", "Linear", "ReLU"]),
        (True, (0, 0.3, 0), False, ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]),
    ],
)
def test_layer_norm_dropout_and_activation_positions_follow_a1111(layer_norm, dropout, activate_output, expected):
    structure = Structure((1.0, 2.0, 1.0), "relu", "Normal", layer_norm, dropout, activate_output)
    assert [type(layer).__name__ for layer in structure.layers(8)] == expected


def test_dropout_structure_places_a_dropout_after_each_layer_with_a_probability():
    structure = Structure((1.0, 2.0, 2.0, 1.0), "linear", "Normal", False, (0.0, 0.1, 0.2, 0.0), False)
    layers = structure.layers(4)
    assert [type(x).__name__ for x in layers] == ["Linear", "Dropout", "Linear", "Dropout", "Linear"]
    assert [layers[1].p, layers[3].p] == [0.1, 0.2]


def test_dropout_masks_repeat_for_the_same_seed_and_scale_kept_values():
    structure = Structure((1.0, 4.0, 1.0), "linear", "Normal", False, (0.0, 0.5, 0.0), False)
    module = new_modules(structure, [64], seed=0)[64][0].train()
    x = torch.randn(8, 64)
    assert torch.equal(module(x, dropout_seed=5), module(x, dropout_seed=5))
    assert not torch.equal(module(x, dropout_seed=5), module(x, dropout_seed=6))
    hidden = module.linear[0](x)
    dropped = module.linear[1].p
    from lib_training.methods.hypernetwork_net import _dropout

    out = _dropout(hidden, dropped, 9, 1)
    kept = out != 0
    assert 0.4 < kept.float().mean() < 0.6
    assert torch.allclose(out[kept], hidden[kept] * 2)


@pytest.mark.parametrize(
    ("init", "check"),
    [
        ("Normal", lambda w, fan_in, fan_out: math.isclose(w.std().item(), 0.01, rel_tol=0.05)),
        ("XavierNormal", lambda w, fi, fo: math.isclose(w.std().item(), math.sqrt(2 / (fi + fo)), rel_tol=0.05)),
        ("XavierUniform", lambda w, fi, fo: w.abs().max().item() <= math.sqrt(6 / (fi + fo))
            and math.isclose(w.std().item(), math.sqrt(2 / (fi + fo)), rel_tol=0.05)),
        ("KaimingNormal", lambda w, fi, fo: math.isclose(w.std().item(), math.sqrt(2 / fi), rel_tol=0.05)),
        ("KaimingUniform", lambda w, fi, fo: w.abs().max().item() <= math.sqrt(6 / fi)
            and math.isclose(w.std().item(), math.sqrt(2 / fi), rel_tol=0.05)),
    ],
)  # fmt: skip
def test_each_weight_init_has_the_expected_statistics(init, check) -> None:
    structure = Structure((1.0, 2.0, 1.0), "relu", init, True, (0.0, 0.0, 0.0), False)
    module = new_modules(structure, [256], seed=0)[256][0]
    first, norm = module.linear[0], module.linear[2]
    assert check(first.weight, 256, 512), (init, first.weight.std().item())
    assert torch.count_nonzero(first.bias) == 0
    # every LayerNorm starts like "Normal" whatever the init, as A1111 does
    assert math.isclose(norm.weight.std().item(), 0.01, rel_tol=0.15) and torch.count_nonzero(norm.bias) == 0


# --- bad settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_structure": "2, 2, 1"}, "must start and end with 1"),
        ({"layer_structure": "1, 2, 0.5"}, "must start and end with 1"),
        ({"layer_structure": "1, -2, 1"}, "not positive"),
        ({"layer_structure": "1, two, 1"}, "not a comma-separated list"),
        ({"layer_structure": "1"}, "at least two"),
        ({"dropout": "0, 0.3"}, "one probability per layer-structure entry"),
        ({"dropout": "0.1, 0.3, 0"}, "start and end with 0"),
        ({"dropout": "0, 1.5, 0"}, "outside"),
        ({"activation": "threshold"}, "needs a threshold"),
        ({"activation": "glu"}, "halves the width"),
        ({"activation": "wiggle"}, "unknown activation"),
        ({"widths": "768, 0"}, "positive whole numbers"),
        ({"widths": "768, 320.5"}, "positive whole numbers"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        HypernetworkMethod(HypernetworkConfig(name="hn", **changes))


def test_a_layer_structure_that_makes_an_empty_layer_is_refused() -> None:
    with pytest.raises(ConfigError, match="width 0"):
        Structure((1.0, 0.01, 1.0)).layers(8)


def test_a_request_names_each_bad_structure_field() -> None:
    from lib_training.methods import spec_for
    from lib_training.options import SettingsError
    from lib_training.training.request import request_errors

    body = {"method": {"name": "hn", "layer_structure": "2, 1", "widths": "0"}, "data": {}}
    errors = request_errors(spec_for("hypernetwork"), body)
    assert "start and end with 1" in errors["method.layer_structure"] and "positive whole" in errors["method.widths"]
    body = {"method": {"name": "hn", "activation": "glu"}, "data": {}}
    assert "must be one of linear, relu" in request_errors(spec_for("hypernetwork"), body)["method.activation"]
    assert issubclass(SettingsError, ConfigError)
