"""A method that exists only in the test suite: a per-channel bias added to every cross-attention
output. Written as a plug-in would be, one settings class, one method class and one spec, to show
that registering it is all a method needs (CLI, API, tab, folders, publishing)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lib_training.model.diffusion import DiffusionModel
from lib_training.model.hooks import ModuleHooks
from lib_training.options import option
from lib_training.training.method import MethodSettings, MethodSpec, ParamGroup, TrainingMethod


@dataclass
class BiasSettings(MethodSettings):
    """A bias on each cross-attention output."""

    init_scale: float = option(0.0, "Standard deviation of the biases' random start.", min=0.0, max=1.0)


class CrossAttentionBias(TrainingMethod):
    kind = "xbias"
    settings_type = BiasSettings
    settings: BiasSettings

    def __init__(self, settings: BiasSettings) -> None:
        super().__init__(settings)
        self.biases: dict[str, nn.Parameter] = {}  # by kohya name: [out_features]
        self.hooks = ModuleHooks()

    def _targets(self, model: DiffusionModel):
        return model.module_map().select(component="unet", kinds={"cross_attn", "attn_out"})

    def attach(self, model: DiffusionModel) -> None:
        generator = torch.Generator().manual_seed(0)
        for entry in self._targets(model):
            start = torch.randn(entry.out_features, generator=generator) * self.settings.init_scale
            self.biases.setdefault(entry.kohya, nn.Parameter(start.to(model.device)))
            self._hook(entry, self.biases[entry.kohya], 1.0)

    def _hook(self, entry, bias: torch.Tensor, strength: float) -> None:
        # output [B, tokens, C] + bias [C]
        self.hooks.add_to_output(entry.module, lambda x, b=bias: (b * strength).to(x.dtype))

    def detach(self) -> None:
        self.hooks.clear()

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("bias", list(self.biases.values()))]

    def save(self, path: Path, step: int, metadata: Mapping[str, str]) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.biases.items()}, str(path), dict(metadata))

    @classmethod
    def load(cls, path: Path, model: DiffusionModel) -> CrossAttentionBias:
        method = cls(BiasSettings(name=Path(path).stem))
        method.biases = {k: nn.Parameter(v, requires_grad=False) for k, v in load_file(str(path)).items()}
        return method

    def apply_for_generation(self, model, strength: float = 1.0):
        import contextlib

        @contextlib.contextmanager
        def applied():
            if not len(self.hooks):  # a loaded file; while training the hooks are on already
                for entry in self._targets(model):
                    self._hook(entry, self.biases[entry.kohya].to(model.device), strength)
                try:
                    yield {}
                finally:
                    self.hooks.clear()
            else:
                yield {}

        return applied()


SPEC = MethodSpec(
    method=CrossAttentionBias,
    title="Cross-attention bias",
    summary="a bias on every cross-attention output (a test method)",
    result_role="loras",
    prompt_tag="xbias",
    loop_defaults={"lr": "0.01"},
)
