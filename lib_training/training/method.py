"""What a training method is: its settings, its registry entry, and what the trainer asks of it.

A method is one module under `lib_training/methods/` with three things:

- a settings dataclass deriving from `MethodSettings` (every field declared with `option(...)`,
  so the UI form, the CLI options and the API schema all come from it);
- a `TrainingMethod` subclass: which parameters train (in named groups, each with its own
  learning rate if it wants one), how it attaches to the model and detaches again, how it saves,
  and how a result is applied at generation time;
- a `MethodSpec`, listed once in `lib_training.methods.REGISTRY`. Everything else (the Training
  sub-tab, the HTTP route, the CLI subcommand, output folders, what publishing a result means in
  a host) is derived from that entry. A method whose results can be made untrained, before any
  training (A1111's "Create hypernetwork"), adds a `CreateStep`: it gets a Create section in its
  sub-tab and the route POST /training/v1/<kind>/create.

The trainer calls `attach` on entry and `detach` in `finally`, so whatever happens the host's model
is as before. Methods that hook modules do it through `lib_training.model.hooks.ModuleHooks`,
which removes every hook it installed.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn
from torch.optim import Optimizer

from lib_training.dataset import Batch, TrainingDataset
from lib_training.model.diffusion import Conditioning, DiffusionModel, EmbeddingVectors
from lib_training.options import SettingsError, option, to_dict

if TYPE_CHECKING:
    from lib_training.training.config import LoopConfig

_BAD_NAME = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")

# Where a method's results go, and what a host refreshes when one is written. The app keeps them in
# OUT/<kind>/; a WebUI in its own folder for the role (embeddings/, models/Lora/, ...).
RESULT_ROLES = ("embeddings", "hypernetworks", "loras")


@dataclass
class MethodSettings:
    """Settings every method has; a method's own settings dataclass derives from this."""

    name: str = option(help="Name of the result: its file name (and, for embeddings, its prompt word).", flag="--name")
    overwrite: bool = option(False, "Replace an existing result of the same name in the output folder.")

    def check(self) -> None:
        """Raise ConfigError if the settings cannot work together (after each field is valid alone).
        Subclasses that check more call `super().check()` first."""
        if not self.name.strip():
            raise SettingsError({"name": "required: give the result a name"})
        if _BAD_NAME.search(self.name) or self.name.strip() != self.name or self.name.startswith("."):
            raise SettingsError(
                {
                    "name": f'{self.name!r} cannot be a file name: avoid / \\ : * ? " < > |, leading dots and '
                    "leading or trailing spaces"
                }
            )


@dataclass
class ParamGroup:
    """Parameters that train together: one optimizer group, with its own learning rate if given."""

    name: str  # "embedding", "unet", "text_encoder", ...
    params: list[nn.Parameter]
    lr: str | None = None  # a learning rate or schedule in the WebUI syntax; None: the loop's


@dataclass
class StepOutputs:
    """What one training step computed, for a method's objective (`TrainingMethod.objective`)."""

    batch: Batch
    x_t: Tensor  # [B, 4, h, w] noised latents
    timesteps: Tensor  # [B]
    target: Tensor  # [B, 4, h, w] epsilon or v, fp32
    prediction: Tensor  # [B, 4, h, w] the UNet's output, fp32
    cond: Conditioning
    loss: Tensor  # the default diffusion loss (scalar)


class TrainingMethod(ABC):
    """One training run's trainable state; see the module docstring."""

    kind: ClassVar[str]  # "embedding": the CLI subcommand, the URL part and the app's output folder
    settings_type: ClassVar[type[MethodSettings]] = MethodSettings

    def __init__(self, settings: MethodSettings) -> None:
        settings.check()
        self.settings = settings

    @property
    def name(self) -> str:
        """The result's name: its file name and, for embeddings, its prompt token."""
        return self.settings.name

    @property
    def suffix(self) -> str:
        """Suffix of the result file."""
        return ".safetensors"

    # --- training -------------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: DiffusionModel) -> None:
        """Create the trainable parameters for `model` and hook them in."""

    @abstractmethod
    def detach(self) -> None:
        """Remove everything `attach` added to the model. Must be safe to call more than once."""

    @abstractmethod
    def param_groups(self) -> list[ParamGroup]:
        """The trainable parameters (fp32), in named groups."""

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups() for p in group.params]

    def check_dataset(self, dataset: TrainingDataset) -> None:  # noqa: B027  (optional for subclasses)
        """Raise a UserError if this method cannot train on `dataset` (before any work is done)."""

    def begin_run(self, dataset: TrainingDataset, loop: LoopConfig) -> None:  # noqa: B027  (optional)
        """Called once before `attach` by the trainer: the run's data and loop settings, for methods
        that seed their own randomness or record the run in their files."""

    @property
    def trains_text_encoders(self) -> bool:
        """Whether the text encoders' outputs can change while training (through the method's vectors or
        hooks). When not, the trainer encodes each prompt once and reuses its output."""
        return True

    def prompt_embeddings(self) -> Mapping[str, EmbeddingVectors]:
        """Textual-inversion vectors to use in prompts, by name (none for most methods)."""
        return {}

    def objective(self, step: StepOutputs) -> Tensor:
        """The loss to minimise; the diffusion loss unless a method adds its own terms."""
        return step.loss

    # --- results --------------------------------------------------------------------------------
    @abstractmethod
    def save(self, path: Path, step: int, metadata: Mapping[str, str]) -> None:
        """Write the result as the hosts load it, atomically."""

    def save_optimizer_state(self, path: Path, optimizer: Optimizer) -> None:  # noqa: B027  (optional)
        """Write optimizer state beside the result just saved at `path`, where a host keeps it there
        (A1111's NAME.pt.optim for hypernetworks). Most methods keep none."""

    def initial_optimizer_state(self) -> Mapping[str, Any] | None:
        """Optimizer state to start a new (not resumed) run from, e.g. that of a file continued."""
        return None

    @classmethod
    @abstractmethod
    def load(cls, path: Path, model: DiffusionModel) -> TrainingMethod:
        """A saved result, ready for `apply_for_generation` on `model`. Raise CheckpointError if the
        file is not one of this method's results or does not fit the model."""

    @contextlib.contextmanager
    def apply_for_generation(self, model: DiffusionModel, strength: float = 1.0) -> Iterator[dict[str, Any]]:
        """Apply the result to `model` at `strength` while inside; yields the textual-inversion vectors
        that prompts may use by name. The default suits methods that only add prompt vectors."""
        yield dict(self.prompt_embeddings())

    # --- resume and records ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Trainable values for resuming, named by group and position."""
        return {
            f"{group.name}.{i}": p.detach().clone() for group in self.param_groups() for i, p in enumerate(group.params)
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        own = self.state_dict()
        if set(state) != set(own):
            raise ValueError(f"resume state has {len(state)} tensors, the method has {len(own)}")
        for group in self.param_groups():
            for i, param in enumerate(group.params):
                param.data.copy_(state[f"{group.name}.{i}"])

    def describe(self) -> dict[str, Any]:
        """Settings of this method for config.json (with its kind, which a settings loader checks)."""
        return {"kind": self.kind, **to_dict(self.settings)}

    @contextlib.contextmanager
    def attached(self, model: DiffusionModel) -> Iterator[None]:
        try:
            self.attach(model)
            yield
        finally:
            self.detach()


@dataclass(frozen=True)
class CreateStep:
    """Making a new, untrained result file on its own, before any training (no model needed)."""

    settings: type  # the settings class whose fields the form and the API take (JSON-like values)
    fields: tuple[str, ...]  # the fields of `settings` that creating takes, in the form's order
    create: Callable[[Mapping[str, Any], Path], Path]  # (values, folder) -> the file written;
    # a SettingsError naming every bad field at once, before anything is written
    summary: str = ""  # one line for the form and the API's description


@dataclass(frozen=True)
class MethodSpec:
    """A method's registry entry (see `lib_training.methods`)."""

    method: type[TrainingMethod]
    title: str  # "Textual inversion": the tab title
    summary: str  # one line for `train --help`
    result_role: str  # one of RESULT_ROLES: where results go and what a host refreshes
    prompt_tag: str | None = None  # "lora": results apply as <lora:NAME:STRENGTH>; None: by name (embeddings)
    loop_defaults: Mapping[str, Any] = field(default_factory=dict)  # the method's own loop defaults (lr, ...)
    data_defaults: Mapping[str, Any] = field(default_factory=dict)
    run_folder_suffix: str | None = None  # WebUI log folders are NAME + this; default ".KIND"
    create: CreateStep | None = None  # a result made untrained, on its own (hypernetworks)

    def __post_init__(self) -> None:
        if self.result_role not in RESULT_ROLES:
            raise ValueError(f"{self.kind}: result_role must be one of {RESULT_ROLES}")

    @property
    def kind(self) -> str:
        return self.method.kind

    @property
    def settings(self) -> type[MethodSettings]:
        return self.method.settings_type

    def build(self, settings: MethodSettings) -> TrainingMethod:
        return self.method(settings)

    def run_folder_name(self, name: str) -> str:
        suffix = f".{self.kind}" if self.run_folder_suffix is None else self.run_folder_suffix
        return name + suffix
