"""Hypernetworks: residual MLPs on what the UNet's attention k and v projections read, in A1111's format.

Per width in the file there are two `HypernetworkModule`s, one for k and one for v (q is left
alone). A1111 replaces the forward of every attention layer (self-attention too, whose "context"
is its own input) and runs the context through the pair for the context's width, so the text
context width (768 SD1, 1024 SD2, 2048 SDXL) reaches the cross-attention layers and the feature
widths (320, 640, 1280) the self-attention layers. Here the same happens without touching any
class: `to_k(x)` becomes `to_k(x + mlp_k(x) * strength)` and `to_v` likewise, through
`ModuleHooks.transform_input`, on every attention k/v projection whose input width has a module.

SDXL: A1111 trains hypernetworks only on SD1/SD2 (its trainer calls the LDM model's forward), but
its attention replacement is installed on sgm's CrossAttention as well, so A1111 applies a
hypernetwork with 2048 (and 640/1280) modules to SDXL at generation time. This module trains and
applies them on SDXL the same way.

Settings follow A1111's Create tab: widths, layer structure, activation, weight init, layer norm,
dropout (a structure, or A1111's default) and activate output. `continue_from` continues a file
(one made by `python -m lib_training hypernetwork create`, by A1111, or by an earlier run): its
structure, weights, step count and, when its `NAME.pt.optim` matches it, the AdamW state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib_training.errors import CheckpointError, ConfigError
from lib_training.formats.hypernetwork_file import (
    HypernetworkFile,
    default_dropout_structure,
    read_hypernetwork,
    read_optimizer_state,
    write_hypernetwork,
    write_optimizer_state,
)
from lib_training.methods.hypernetwork_attach import Attachment, KVSite, find_kv_sites, widths_text
from lib_training.methods.hypernetwork_net import (
    ACTIVATIONS,
    WEIGHT_INITS,
    HypernetworkModule,
    Structure,
    check_activation,
    check_dropout_structure,
    check_layer_structure,
    check_weight_init,
    parse_numbers,
)
from lib_training.model.diffusion import DiffusionModel
from lib_training.model.hooks import ModuleHooks
from lib_training.options import SettingsError, field_errors, from_dict, option
from lib_training.seeding import derive_seed
from lib_training.training.method import (
    CreateStep,
    MethodSettings,
    MethodSpec,
    ParamGroup,
    StepOutputs,
    TrainingMethod,
)

A1111_DEFAULT_WIDTHS = (768, 320, 640, 1280)  # A1111's Create tab ticks these
_DROPOUT_CALLS = "hypernetwork.dropout_calls"


@dataclass
class HypernetworkConfig(MethodSettings):
    """What to train: a new hypernetwork (or an existing file, continued)."""

    name: str = option(help="Name of the hypernetwork: its file name NAME.pt.", flag="--name")
    widths: str = option(
        "auto",
        "Widths that get modules: a list such as '768, 320, 640, 1280' (SD1; SD2 1024, SDXL 2048 for the text "
        "context, then 320, 640, 1280 / 640, 1280) or 'auto': when training, every width this model's attention "
        "k/v projections read (the text context and the feature widths); when creating, with no model to ask, "
        "A1111's 768, 320, 640, 1280.",
    )
    layer_structure: str = option(
        "1, 2, 1", "Width multipliers of the layers, starting and ending with 1 (e.g. '1, 2, 1' or '1, 1.5, 1.5, 1')."
    )
    activation: str = option(
        "linear", "Activation after each layer but the last ('linear': none).", choices=ACTIVATIONS
    )
    weight_init: str = option("Normal", "Initial weights of the layers.", choices=WEIGHT_INITS, advanced=True)
    layer_norm: bool = option(False, "Add a LayerNorm after each layer.")
    dropout: str = option(
        "",
        "Dropout: a probability per layer-structure entry, first and last 0 (e.g. '0, 0.3, 0'); 'default' for "
        "A1111's 0.3 after each hidden layer but the last; empty for none.",
    )
    last_layer_dropout: bool = option(
        False, "With --dropout default: dropout after the last hidden layer too.", advanced=True
    )
    activate_output: bool = option(False, "Apply the activation after the last layer too.", advanced=True)
    init_seed: int = option(0, "Seed of the initial weights and of the dropout masks.", min=0, advanced=True)
    continue_from: str | None = option(
        None,
        "A hypernetwork file to continue training (A1111's, or one made by 'hypernetwork create'); its "
        "structure is used and the structure settings here are ignored.",
        advanced=True,
    )
    overwrite: bool = option(False, "Replace an existing hypernetwork of the same name in the output folder.")

    def check(self) -> None:
        """Every bad field at once, by name (a SettingsError): the name, then the structure."""
        errors: dict[str, str] = {}
        try:
            super().check()
        except SettingsError as error:
            errors.update(error.errors)
        checks = (
            ("layer_structure", self._layers),
            ("dropout", lambda: self._dropout(self._layers())),
            ("activation", lambda: check_activation(self.activation)),
            ("weight_init", lambda: check_weight_init(self.weight_init)),
            ("widths", self.width_list),
        )
        for name, check in checks:
            if name == "dropout" and "layer_structure" in errors:
                continue  # checked against the layer structure
            try:
                check()
            except ConfigError as error:
                errors[name] = str(error)
        if errors:
            raise SettingsError(errors)

    def structure(self) -> Structure:
        """The layer structure these settings describe; ConfigError naming a bad field."""
        layers = self._layers()
        return Structure(
            tuple(layers),
            check_activation(self.activation),
            self.weight_init,
            self.layer_norm,
            tuple(self._dropout(layers)),
            self.activate_output,
        )

    def _layers(self) -> list[float]:
        return check_layer_structure(parse_numbers(self.layer_structure, "layer structure", "1, 2, 1"))

    def _dropout(self, layers: list[float]) -> list[float]:
        text = self.dropout.strip()
        if text.lower() == "default":
            return default_dropout_structure(layers, True, self.last_layer_dropout)
        if text:
            return check_dropout_structure(parse_numbers(text, "dropout structure", "0, 0.3, 0"), layers)
        return [0.0] * len(layers)

    def width_list(self) -> list[int] | None:
        """The widths asked for; None for 'auto'."""
        if self.widths.strip().lower() == "auto":
            return None
        values = parse_numbers(self.widths, "widths", "768, 320, 640, 1280")
        if any(v != int(v) or v < 1 for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"the widths {self.widths!r} must be different positive whole numbers, e.g. '768, 320'")
        return [int(v) for v in values]


def new_modules(
    structure: Structure, widths: list[int], seed: int, device: torch.device | None = None
) -> dict[int, tuple[HypernetworkModule, HypernetworkModule]]:
    """Freshly initialised (k, v) module pairs per width, fp32, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for width in widths:
        pair = (HypernetworkModule(width, structure), HypernetworkModule(width, structure))
        for module in pair:
            module.initialise(structure.weight_init, structure.activation, generator)
            module.to(device).eval().requires_grad_(False)
        modules[width] = pair
    return modules


def modules_from_file(
    loaded: HypernetworkFile, device: torch.device | None = None
) -> tuple[Structure, dict[int, tuple[HypernetworkModule, HypernetworkModule]]]:
    """The structure and (k, v) modules of a file; CheckpointError if they do not fit its settings."""
    try:
        structure = Structure(
            tuple(loaded.layer_structure),
            check_activation(loaded.activation_func),
            loaded.weight_initialization,
            loaded.is_layer_norm,
            tuple(loaded.dropout_structure),
            loaded.activate_output,
        )
    except ConfigError as error:
        raise CheckpointError(f"the hypernetwork {loaded.name!r} cannot be built: {error}") from None
    modules = {}
    for width, states in loaded.layers.items():
        pair = (HypernetworkModule(width, structure), HypernetworkModule(width, structure))
        for module, state in zip(pair, states):
            try:
                module.load_state_dict(state)
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0]
                raise CheckpointError(
                    f"the hypernetwork {loaded.name!r} does not match its own settings at width {width} ({first})"
                ) from None
            module.to(device).eval().requires_grad_(False)
        modules[width] = pair
    return structure, modules


class HypernetworkMethod(TrainingMethod):
    kind = "hypernetwork"
    settings_type = HypernetworkConfig
    settings: HypernetworkConfig

    def __init__(self, settings: HypernetworkConfig) -> None:
        super().__init__(settings)
        self.structure = settings.structure()
        self.modules: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
        self.start_step = 0  # steps the file had before this run (continue_from)
        self.dropout_calls = 0  # micro-batches trained: with the site, the seed of each dropout mask
        self._hooks = ModuleHooks()
        self._model: DiffusionModel | None = None
        self._attached: Attachment | None = None
        self._optimizer_start: dict[str, Any] | None = None

    @property
    def suffix(self) -> str:
        return ".pt"

    @property
    def trains_text_encoders(self) -> bool:
        return False  # only what the UNet's k/v projections read changes: each prompt is encoded once

    # --- training -------------------------------------------------------------------------------
    def attach(self, model: DiffusionModel) -> None:
        sites = find_kv_sites(model)
        present = {site.width for site in sites}
        if self.settings.continue_from:
            path = Path(self.settings.continue_from)
            loaded = read_hypernetwork(path)
            self.structure, self.modules = modules_from_file(loaded, model.device)
            self.start_step = loaded.step
            saved = read_optimizer_state(path)
            self._optimizer_start = saved[1] if saved and saved[0] == "AdamW" else None
            if not present & set(self.modules):
                raise ConfigError(
                    f"{path.name} has modules for widths {widths_text(self.modules)}, but this model's attention "
                    f"reads {widths_text(present)}: it was made for another model family"
                )
        else:
            widths = self.settings.width_list() or sorted(present, key=lambda w: (w not in _context(sites), w))
            missing = [w for w in widths if w not in present]
            if missing:
                raise ConfigError(
                    f"this model's attention k/v projections read widths {widths_text(present, sites)}; "
                    f"{widths_text(missing)} is not one of them. Choose from those, or 'auto'."
                )
            for width in widths:
                self.structure.widths(width)  # a layer of width 0 is an error before anything is built
            seed = derive_seed(self.settings.init_seed, "hypernetwork-init")
            self.modules = new_modules(self.structure, widths, seed % 2**63, model.device)
        for pair in self.modules.values():
            for module in pair:
                module.train().requires_grad_(True)
        self._install(model, sites, strength=1.0)

    def detach(self) -> None:
        self._hooks.clear()
        if self._attached is not None:
            self._attached.clear()
        self._attached = None
        self._model = None
        for pair in self.modules.values():
            for module in pair:
                module.eval().requires_grad_(False)

    def param_groups(self) -> list[ParamGroup]:
        # A1111's order (per width, k then v), so that NAME.pt.optim is A1111's optimizer state too
        params = [p for pair in self.modules.values() for module in pair for p in module.parameters()]
        return [ParamGroup("hypernetwork", params)]

    def objective(self, step: StepOutputs) -> Tensor:
        self.dropout_calls += 1  # the next micro-batch draws new dropout masks
        return step.loss

    def initial_optimizer_state(self) -> Mapping[str, Any] | None:
        """AdamW state from NAME.pt.optim of the file continued, when it matches this run's parameters."""
        state = self._optimizer_start
        if not state or len(state.get("param_groups", [])) != 1:
            return None
        if len(state["param_groups"][0].get("params", [])) != len(self.param_groups()[0].params):
            return None
        return state

    def _attachment(self, strength: float) -> Attachment:
        def dropout_seed(index: int, part: str) -> int:
            return derive_seed(self.settings.init_seed, "dropout", self.dropout_calls, index, part) % 2**62

        return Attachment(self.modules, strength, dropout_seed, any(self.structure.dropout_structure))

    def _install(self, model: DiffusionModel, sites: list[KVSite], strength: float) -> None:
        self._attached = self._attachment(strength)
        self._attached.install(self._hooks, model, sites)
        self._model = model

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), _DROPOUT_CALLS: torch.tensor(self.dropout_calls)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        params = self.param_groups()[0].params
        if set(state) != {*(f"hypernetwork.{i}" for i in range(len(params))), _DROPOUT_CALLS}:
            raise ValueError(f"resume state has {len(state)} tensors, the hypernetwork {len(params)} parameters")
        for i, param in enumerate(params):
            param.data.copy_(state[f"hypernetwork.{i}"])
        self.dropout_calls = int(state[_DROPOUT_CALLS])

    # --- results ------------------------------------------------------------------------------------
    def to_file(self, step: int, metadata: Mapping[str, str]) -> HypernetworkFile:
        s = self.structure
        layers = {width: (k.state_dict(), v.state_dict()) for width, (k, v) in self.modules.items()}
        return HypernetworkFile(
            name=self.name,
            layers=layers,
            layer_structure=list(s.layer_structure),
            activation_func=s.activation,
            weight_initialization=s.weight_init,
            is_layer_norm=s.layer_norm,
            use_dropout=any(s.dropout_structure),
            dropout_structure=list(s.dropout_structure),
            activate_output=s.activate_output,
            step=self.start_step + step,
            sd_checkpoint=metadata.get("sd_checkpoint") or None,
            sd_checkpoint_name=metadata.get("sd_checkpoint_name") or None,
        )

    def save(self, path: Path, step: int, metadata: Mapping[str, str]) -> None:
        write_hypernetwork(path, self.to_file(step, metadata))

    def save_optimizer_state(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """NAME.pt.optim beside the file, as A1111 writes it (only for AdamW, the one A1111 reloads)."""
        if type(optimizer) is torch.optim.AdamW:
            write_optimizer_state(path, optimizer.state_dict(), "AdamW")

    @classmethod
    def load(cls, path: Path, model: DiffusionModel) -> HypernetworkMethod:
        """A hypernetwork file ready for `apply_for_generation` on `model`; named by the file's stem."""
        loaded = read_hypernetwork(path)
        present = {site.width for site in find_kv_sites(model)}
        if not present & set(loaded.layers):
            raise CheckpointError(
                f"the hypernetwork {Path(path).stem!r} has modules for widths {widths_text(loaded.layers)}, but "
                f"this model's attention reads {widths_text(present)}: it was made for another model family"
            )
        method = cls(HypernetworkConfig(name=Path(path).stem))
        method.structure, method.modules = modules_from_file(loaded, model.device)
        method.start_step = loaded.step
        return method

    @contextlib.contextmanager
    def apply_for_generation(self, model: DiffusionModel, strength: float = 1.0) -> Iterator[dict[str, Any]]:
        """The modules on `model` at `strength` while inside (in eval mode: no dropout). While training
        (a preview), the hooks are already there: only dropout is switched off."""
        if self._model is model:
            modes = [module.training for pair in self.modules.values() for module in pair]
            for pair in self.modules.values():
                for module in pair:
                    module.eval()
            try:
                yield {}
            finally:
                flat = [module for pair in self.modules.values() for module in pair]
                for module, mode in zip(flat, modes):
                    module.train(mode)
            return
        hooks = ModuleHooks()
        attachment = self._attachment(strength)
        with hooks.applied():
            attachment.install(hooks, model, find_kv_sites(model))
            try:
                yield {}
            finally:
                attachment.clear()


CREATE_FIELDS = (
    "name",
    "widths",
    "layer_structure",
    "activation",
    "weight_init",
    "layer_norm",
    "dropout",
    "last_layer_dropout",
    "activate_output",
    "init_seed",
    "overwrite",
)


def create_problems(settings: HypernetworkConfig, out: str | Path) -> dict[str, str]:
    """Every reason A1111's Create step cannot write `settings` to OUT/NAME.pt, by field (empty: none)."""
    errors: dict[str, str] = {}
    try:
        settings.check()
    except SettingsError as error:
        errors.update(error.errors)
    if settings.continue_from:
        errors["continue_from"] = "create makes a new hypernetwork; continue_from belongs to training"
    if "layer_structure" not in errors and "widths" not in errors:
        layers = tuple(settings._layers())
        for width in settings.width_list() or A1111_DEFAULT_WIDTHS:
            try:
                Structure(layers, dropout_structure=(0.0,) * len(layers)).widths(width)
            except ConfigError as error:
                errors["layer_structure"] = str(error)
                break
    path = Path(out) / f"{settings.name}.pt"
    if "name" not in errors and path.exists() and not settings.overwrite:
        errors["name"] = f"{path} already exists; choose another name, or allow overwriting"
    return errors


def create_hypernetwork(settings: HypernetworkConfig, out: str | Path) -> Path:
    """A1111's Create step: write OUT/NAME.pt with new weights for the settings' widths (A1111's
    default 768, 320, 640, 1280 for 'auto', as there is no model to ask), step 0, no optimizer state.
    A SettingsError names every bad field first (`create_problems`)."""
    errors = create_problems(settings, out)
    if errors:
        raise SettingsError(errors)
    path = Path(out) / f"{settings.name}.pt"
    method = HypernetworkMethod(settings)
    widths = settings.width_list() or list(A1111_DEFAULT_WIDTHS)
    method.modules = new_modules(method.structure, widths, derive_seed(settings.init_seed, "hypernetwork-init") % 2**63)
    path.parent.mkdir(parents=True, exist_ok=True)
    method.save(path, 0, {})
    return path


def create_from_values(values: Mapping[str, Any], out: Path) -> Path:
    """`create_hypernetwork` from JSON-like values (the form's, the API's): each field's kind and range
    and then `create_problems`, every bad field named in one SettingsError."""
    errors = field_errors(HypernetworkConfig, values)
    for name in set(values) - set(CREATE_FIELDS) - set(errors):
        errors[name] = "not a setting of creating a hypernetwork"
    valid = {name: value for name, value in values.items() if name not in errors}
    settings = from_dict(HypernetworkConfig, {"name": "", **valid})
    for name, problem in create_problems(settings, out).items():
        errors.setdefault(name, problem)
    if errors:
        raise SettingsError(errors)
    return create_hypernetwork(settings, out)


def _context(sites: list[KVSite]) -> set[int]:
    return {site.width for site in sites if site.cross}


SPEC = MethodSpec(
    method=HypernetworkMethod,
    title="Hypernetwork",
    summary="hypernetwork: residual MLPs on attention k/v inputs, A1111's .pt (SD1, SD2, SDXL)",
    result_role="hypernetworks",
    prompt_tag="hypernet",
    loop_defaults={"lr": "0.000005"},
    data_defaults={"template": "filewords"},  # a hypernetwork has no prompt word: captions only
    create=CreateStep(
        HypernetworkConfig,
        CREATE_FIELDS,
        create_from_values,
        "A new, untrained hypernetwork NAME.pt in A1111's format (A1111's Create step), to train with "
        "'continue from' or to use as it is.",
    ),
)
