"""The settings of each merge-tab operation, as dataclasses a UI, the CLI and the HTTP API are built from.

Fields are declared with `lib_training.options.option` (help, choices, range, the `role` of a text
field such as "model" or "blocks", and `used_by`: the merge methods that use it), so the CLI, the
UI and the API are generated from them. `validate()` adds the checks that involve several fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lib_training.errors import ConfigError
from lib_training.merge.methods import MERGE_METHODS
from lib_training.options import option

DTYPE_CHOICES = ("fp16", "bf16", "fp32")
DYNAMIC_METHODS = ("none", "sv_ratio", "sv_fro", "sv_cumulative")
_USES_C = tuple(name for name, m in MERGE_METHODS.items() if "c" in m.models)
_USES_B = tuple(name for name, m in MERGE_METHODS.items() if "b" in m.models)


@dataclass
class MergeConfig:
    """A checkpoint merge: which models, which formula, which ratios, what to write."""

    a: str = option(
        help="Model A: the primary model; its keys, metadata and extra input channels are kept.",
        role="model",
        label="Model A",
    )
    out: str = option(help="Output .safetensors file.", role="output", label="Output file")
    method: str = option("weighted_sum", "Merge formula (see the methods list).", choices=tuple(MERGE_METHODS))
    b: str = option(
        "",
        "Model B: the second model, combined with A by the method's formula.",
        role="model",
        used_by=_USES_B,
        label="Model B",
    )
    c: str = option(
        "",
        "Model C: the base of B for add/train difference; the common base of A and B for ties and dare.",
        role="model",
        used_by=_USES_C,
        label="Model C",
    )
    alpha: float = option(0.5, "Ratio alpha (see the method's formula).", min=-1.0, max=2.0)
    beta: float = option(
        0.0, "Ratio beta (triple_sum, sum_twice).", min=-1.0, max=2.0, used_by=("triple_sum", "sum_twice")
    )
    blocks: str = option(
        "",
        "Alpha per block: 26 comma-separated values for SD1/SD2 (BASE, IN00-IN11, M00, "
        "OUT00-OUT11), 20 for SDXL (BASE, IN00-IN08, M00, OUT00-OUT08), or a preset name.",
        role="blocks",
    )
    blocks_beta: str = option("", "Beta per block, as for blocks.", role="blocks", used_by=("triple_sum", "sum_twice"))
    unet_alpha: float | None = option(
        None, "Alpha for the UNet where no block weight is given (empty: alpha).", min=-1.0, max=2.0
    )
    text_encoder_alpha: float | None = option(
        None, "Alpha for the text encoder(s) where BASE is not given (empty: alpha).", min=-1.0, max=2.0
    )
    vae_alpha: float | None = option(None, "Alpha for the VAE (empty: alpha).", min=-1.0, max=2.0)
    density: float = option(
        0.2, "Ties, dare: fraction of each difference (A - C, B - C) kept.", min=0.0, max=1.0, used_by=("ties", "dare")
    )
    seed: int = option(0, "Dare: seed of the random drop.", used_by=("dare",))
    weights_clip: bool = option(False, "Clamp each merged weight to the range of the inputs' weights.")
    include: str = option("", "Merge only keys matching this regex (others are copied from A).", role="regex")
    exclude: str = option("", "Copy keys matching this regex from A instead of merging them.", role="regex")
    discard: str = option("", "Leave keys matching this regex out of the output.", role="regex")
    prune_ema: bool = option(True, "Leave EMA weights (model_ema.*) out of the output.")
    vae: str = option("", "Bake this VAE into the output (replaces the VAE weights).", role="vae")
    dtype: str = option("fp16", "Data type of the output's float tensors.", choices=DTYPE_CHOICES, label="Output dtype")
    device: str = option(
        "cpu",
        "Where to compute: cpu, cuda or cuda:N (inputs are read and computed in fp32 there, one piece at a time).",
    )
    copy_metadata: bool = option(True, "Start the output's metadata from model A's.")
    copy_config: bool = option(
        True, "Copy the first input's .yaml config (A, else B, else C) beside the output, as A1111's merger does."
    )
    hash_inputs: bool = option(
        True,
        "Record each input's sha256 in the metadata as A1111 does (reads each input once more, alongside the merge).",
    )
    overwrite: bool = option(False, "Replace the output file if it exists.")

    def models(self) -> dict[str, Path]:
        """The input models the method uses, by letter."""
        return {letter: Path(getattr(self, letter)) for letter in MERGE_METHODS[self.method].models}

    def validate(self) -> None:
        """Raise ConfigError for a setting that cannot work, naming the fix."""
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"unknown merge method {self.method!r}; choose one of: {', '.join(MERGE_METHODS)}")
        method = MERGE_METHODS[self.method]
        for letter in method.models:
            if not getattr(self, letter):
                raise ConfigError(f"the {self.method} method needs model {letter.upper()}: give --{letter}")
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1]; got {self.density}")
        for name in ("include", "exclude", "discard"):
            _check_regex(name, getattr(self, name))
        _check_common(self.out, self.dtype, self.overwrite, [Path(p) for p in self.models().values()])


@dataclass
class LoraSpec:
    """One LoRA to bake: the file, its strength, and optionally its weight per block."""

    path: str = option(help="LoRA file (kohya LoRA, LoCon or DoRA).", role="lora")
    strength: float = option(1.0, "Strength, as in <lora:name:strength>.", min=-2.0, max=2.0)
    blocks: str = option(
        "",
        "Strength multiplier per block (BASE = text encoder), 26 values for SD1/SD2, 20 for SDXL, or a preset name.",
        role="blocks",
    )


@dataclass
class LoraBakeConfig:
    """Bake LoRAs into a checkpoint: W += strength · block weight · (alpha / rank) · up @ down (DoRA: that
    strength times the change of W to its dora_scale-normalised direction)."""

    model: str = option(help="Checkpoint to bake into.", role="model")
    out: str = option(help="Output .safetensors file.", role="output", label="Output file")
    # Not a plain value: the CLI reads it from repeated --lora options, the UI from rows of LoraSpec.
    loras: list[LoraSpec] = field(
        default_factory=list, metadata={"help": "LoRAs to bake, applied in order", "internal": True}
    )
    dtype: str = option("fp16", "Data type of the output's float tensors.", choices=DTYPE_CHOICES, label="Output dtype")
    device: str = option("cpu", "Where to compute: cpu, cuda or cuda:N.")
    prune_ema: bool = option(True, "Leave EMA weights (model_ema.*) out of the output.")
    copy_metadata: bool = option(True, "Start the output's metadata from the checkpoint's.")
    copy_config: bool = option(True, "Copy the checkpoint's .yaml config beside the output, as A1111's merger does.")
    overwrite: bool = option(False, "Replace the output file if it exists.")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("give the checkpoint to bake into (--model)")
        if not self.loras:
            raise ConfigError("give at least one LoRA to bake (--lora)")
        for spec in self.loras:
            if not spec.path:
                raise ConfigError("a LoRA without a file was given")
        _check_common(self.out, self.dtype, self.overwrite, [Path(self.model)])


@dataclass
class LoraExtractConfig:
    """Extract a LoRA from the difference of a tuned model and its base, by SVD (kohya format)."""

    base: str = option(help="The original model.", role="model")
    tuned: str = option(help="The fine-tuned model.", role="model")
    out: str = option(help="Output LoRA .safetensors file.", role="output", label="Output file")
    rank: int = option(32, "Rank (dim) of the linear and 1x1 layers.", min=1, max=1024)
    conv_rank: int = option(
        0, "Rank of the 3x3 convolutions of the ResBlocks and samplers (LoCon); 0: leave them out.", min=0, max=1024
    )
    clamp_quantile: float = option(
        0.99, "Clamp the factors' values to this quantile of their magnitudes (1: no clamping).", min=0.5, max=1.0
    )
    min_diff: float = option(
        0.01, "A text encoder whose weights differ by at most this everywhere is left out.", min=0.0, max=1.0
    )
    dtype: str = option("fp16", "Data type of the LoRA's tensors.", choices=DTYPE_CHOICES, label="Output dtype")
    device: str = option("cpu", "Where to compute the SVDs: cpu, cuda or cuda:N.")
    overwrite: bool = option(False, "Replace the output file if it exists.")

    def validate(self) -> None:
        if self.rank < 1 or self.conv_rank < 0:
            raise ConfigError("rank must be at least 1 and conv rank at least 0")
        if not 0 < self.clamp_quantile <= 1:
            raise ConfigError(f"clamp quantile must be in (0, 1]; got {self.clamp_quantile}")
        for name in ("base", "tuned"):
            if not getattr(self, name):
                raise ConfigError(f"give the {name} model (--{name})")
        _check_common(self.out, self.dtype, self.overwrite, [Path(self.base), Path(self.tuned)])


@dataclass
class LoraResizeConfig:
    """Change a LoRA's rank: SVD of each module's up @ down, keeping the largest singular values (a DoRA
    file keeps its dora_scale)."""

    lora: str = option(help="LoRA file (kohya LoRA, LoCon or DoRA).", role="lora")
    out: str = option(help="Output LoRA .safetensors file.", role="output", label="Output file")
    rank: int = option(8, "New rank (the most kept, with a dynamic method).", min=1, max=1024)
    conv_rank: int = option(0, "New rank of 3x3 convolutions; 0: same as rank.", min=0, max=1024)
    dynamic_method: str = option(
        "none",
        "Choose each module's rank: sv_ratio keeps singular values above "
        "the largest / param; sv_fro keeps param of the squared Frobenius norm; "
        "sv_cumulative keeps param of the sum of singular values.",
        choices=DYNAMIC_METHODS,
    )
    dynamic_param: float = option(
        0.0, "Parameter of the dynamic method (ratio > 1, or fraction in (0, 1]).", min=0.0, max=100.0
    )
    dtype: str = option("fp16", "Data type of the LoRA's tensors.", choices=DTYPE_CHOICES, label="Output dtype")
    device: str = option("cpu", "Where to compute the SVDs: cpu, cuda or cuda:N.")
    overwrite: bool = option(False, "Replace the output file if it exists.")

    def validate(self) -> None:
        if self.rank < 1 or self.conv_rank < 0:
            raise ConfigError("rank must be at least 1 and conv rank at least 0")
        if self.dynamic_method not in DYNAMIC_METHODS:
            raise ConfigError(f"unknown dynamic method {self.dynamic_method!r}; choose {', '.join(DYNAMIC_METHODS)}")
        if self.dynamic_method == "sv_ratio" and self.dynamic_param <= 1:
            raise ConfigError("sv_ratio needs a parameter above 1 (e.g. 10)")
        if self.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < self.dynamic_param <= 1:
            raise ConfigError(f"{self.dynamic_method} needs a parameter in (0, 1] (e.g. 0.9)")
        _check_common(self.out, self.dtype, self.overwrite, [Path(self.lora)])


def _check_regex(name: str, pattern: str) -> None:
    if pattern:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{name}: {pattern!r} is not a valid regular expression ({error})") from None


def _check_common(out: str, dtype: str, overwrite: bool, inputs: list[Path]) -> None:
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if not out:
        raise ConfigError("give the output file (--out)")
    target = Path(out)
    if target.suffix.lower() != ".safetensors":
        raise ConfigError(f"{target.name}: outputs are written as .safetensors; use that extension")
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; choose another name or allow overwriting")
    for path in inputs:
        if path.exists() and target.exists() and target.resolve() == path.resolve():
            raise ConfigError(f"the output {target.name} is also an input; write to a new file")
