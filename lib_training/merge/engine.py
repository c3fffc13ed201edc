"""Streaming checkpoint merges.

Inputs are opened lazily (safetensors read by offset; a pickled .ckpt is loaded whole, safely).
Every check that can fail (families, shapes, settings, disk space) runs before any tensor is
computed. Then each output tensor is computed in fp32 on the chosen device, in pieces of a few
million elements for element-wise methods (whole tensors for the others), converted to the output
dtype and appended to the output file, whose header was written first from the known names,
shapes and dtypes. Memory stays near a few pieces, time near the disk's.

Which keys are merged (A1111's rules where it has them):
- The output has model A's keys, less `discard` matches and, with `prune_ema`, `model_ema.*`.
- UNet, text-encoder and VAE weights are merged; everything else (noise-schedule buffers,
  `position_ids`, integer tensors) is copied from A, as are keys that `include`/`exclude` leave
  out and keys missing from another input (reported in the result's warnings).
- A UNet input convolution with more channels in A (inpainting 9, instruct-pix2pix 8) than in the
  others (4) merges its first 4 input channels and keeps the rest from A.
- A baked VAE replaces the VAE weights whatever the method.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib_training.devices import DTYPES, pick_device
from lib_training.errors import CheckpointError
from lib_training.formats.detection import EMA_PREFIX, TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX, states_prediction
from lib_training.formats.family import Arch, ModelFamily
from lib_training.formats.file_hashes import legacy_hash
from lib_training.formats.safetensors_writer import TensorEntry, placeholder
from lib_training.formats.tensor_files import TensorSource
from lib_training.merge.blocks import block_of, parse_blocks
from lib_training.merge.config import MergeConfig
from lib_training.merge.hashing import HashJob
from lib_training.merge.inputs import check_same_family, family_of, vae_entries
from lib_training.merge.metadata import HASH_WIDTH, InputModel, merged_metadata
from lib_training.merge.methods import MERGE_METHODS, KeyContext, MergeMethod, clip_to_inputs
from lib_training.merge.progress import CancelToken, ProgressCallback
from lib_training.merge.reader import get_flat_range, is_loaded_whole, open_input, prefetch
from lib_training.merge.stream import (
    CHUNK_ELEMENTS,
    OutputTensor,
    chunks,
    compute_threads,
    copy_model_config,
    to_output,
    write_stream,
)

UNET_INPUT_CONV = UNET_PREFIX + "input_blocks.0.0.weight"


@dataclass
class MergeResult:
    """What a merge wrote."""

    path: Path
    data_sha256: str  # sha256 of the tensor data (modelspec.hash_sha256 without "0x")
    input_sha256: dict[str, str]  # model letter -> sha256 of the input file (unless not hashed)
    metadata: dict[str, str]
    size: int  # bytes
    seconds: float
    merged: int  # tensors computed by the method
    copied: int  # tensors copied (or converted) from one input
    warnings: list[str] = field(default_factory=list)


def output_dtype(key: str, stored: torch.dtype, shape: tuple[int, ...], arch: Arch, dtype: torch.dtype) -> torch.dtype:
    """The dtype a key is written in: `dtype` for model weights (EMA ones included), else as stored.

    Noise-schedule buffers (alphas_cumprod, ...) and scalars (model_ema.decay) keep their precision.
    """
    weight = component_of(key, arch) is not None or key.startswith(EMA_PREFIX)
    return dtype if stored.is_floating_point and weight and len(shape) > 0 else stored


def component_of(key: str, arch: Arch) -> str | None:
    """ "unet", "text_encoder", "vae" or None for keys of no component."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if any(key.startswith(slot.prefix) for slot in TEXT_ENCODERS[arch]):
        return "text_encoder"
    return None


@dataclass(frozen=True)
class _Ratios:
    """alpha and beta of every key: block weights first, then the component's ratio, then the global one."""

    config: MergeConfig
    arch: Arch
    blocks_alpha: dict[str, float]
    blocks_beta: dict[str, float]

    def of(self, key: str, component: str) -> tuple[float, float]:
        alpha = {"unet": self.config.unet_alpha, "text_encoder": self.config.text_encoder_alpha}.get(component)
        if component == "vae":
            alpha = self.config.vae_alpha
        alpha = self.config.alpha if alpha is None else alpha
        beta = self.config.beta
        if component in ("unet", "text_encoder") and (self.blocks_alpha or self.blocks_beta):
            block = block_of(key, self.arch)
            alpha = self.blocks_alpha.get(block, alpha)  # type: ignore[arg-type]
            beta = self.blocks_beta.get(block, beta)  # type: ignore[arg-type]
        return alpha, beta


class _Merger:
    """Plans and produces the output tensors of one merge."""

    def __init__(
        self,
        config: MergeConfig,
        sources: dict[str, TensorSource],
        family: ModelFamily,
        vae: TensorSource | None,
    ) -> None:
        self.config = config
        self.method: MergeMethod = MERGE_METHODS[config.method]
        self.sources = sources
        self.key_sets = {letter: set(source.keys()) for letter, source in sources.items()}
        self.family = family
        self.vae = vae
        self.device = pick_device(config.device)
        self.out_dtype = DTYPES[config.dtype]
        self.ratios = _Ratios(
            config,
            family.arch,
            parse_blocks(config.blocks, family.arch),
            parse_blocks(config.blocks_beta, family.arch),
        )
        self.include = re.compile(config.include) if config.include else None
        self.exclude = re.compile(config.exclude) if config.exclude else None
        self.discard = re.compile(config.discard) if config.discard else None
        self.merged = 0
        self.copied = 0
        self.missing: list[str] = []
        self.channel_merge = False
        self._buffers: dict[str, tuple[Tensor, Tensor]] = {}

    # --- planning -------------------------------------------------------------------------------
    def plan(self) -> list[OutputTensor]:
        a = self.sources["a"]
        outputs: list[OutputTensor] = []
        vae_keys = vae_entries(self.vae) if self.vae is not None else {}
        for key in list(a.keys()):
            if self.discard and self.discard.search(key):
                continue
            if self.config.prune_ema and key.startswith(EMA_PREFIX):
                continue
            if vae_keys and key.startswith(VAE_PREFIX):
                continue  # replaced by the baked VAE below
            outputs.append(self._plan_key(key))
        for key, (source_key, shape) in vae_keys.items():
            if self.discard and self.discard.search(key):
                continue
            entry = TensorEntry(key, self.out_dtype, shape)
            copier = self._copier(self.vae, source_key, entry)  # type: ignore[arg-type]
            outputs.append(OutputTensor(entry, copier, _prefetcher([(self.vae, source_key)])))  # type: ignore[list-item]
            self.copied += 1
        return outputs

    def _plan_key(self, key: str) -> OutputTensor:
        a = self.sources["a"]
        stored = a.dtype(key)
        entry = TensorEntry(
            key, output_dtype(key, stored, a.shape(key), self.family.arch, self.out_dtype), a.shape(key)
        )
        component = component_of(key, self.family.arch)
        if not self._merges(key, stored, component):
            self.copied += 1
            return OutputTensor(entry, self._copier(a, key, entry), _prefetcher([(a, key)]))
        alpha, beta = self.ratios.of(key, component)  # type: ignore[arg-type]
        if self.method.is_identity(alpha, beta):
            self.copied += 1
            return OutputTensor(entry, self._copier(a, key, entry), _prefetcher([(a, key)]))
        others = [letter for letter in self.method.models if letter != "a"]
        if any(key not in self.key_sets[letter] for letter in others):
            self.missing.append(key)
            self.copied += 1
            return OutputTensor(entry, self._copier(a, key, entry), _prefetcher([(a, key)]))
        channels = self._check_shapes(key)
        self.merged += 1
        context = KeyContext(key, self.config.density, self.config.seed)
        reads = _prefetcher([(self.sources[letter], key) for letter in self.method.models])
        if channels is None and self.method.elementwise:
            return OutputTensor(entry, self._elementwise(key, entry, alpha, beta, context), reads)
        return OutputTensor(entry, self._whole(key, entry, alpha, beta, context, channels), reads)

    def _merges(self, key: str, stored: torch.dtype, component: str | None) -> bool:
        if component is None or not stored.is_floating_point or key.endswith("position_ids"):
            return False
        if self.method.name == "none":
            return False
        if self.include and not self.include.search(key):
            return False
        return not (self.exclude and self.exclude.search(key))

    def _check_shapes(self, key: str) -> int | None:
        """None if all inputs have A's shape; the channels to merge for a narrower UNet input conv."""
        a_shape = self.sources["a"].shape(key)
        narrowest = a_shape[1] if len(a_shape) > 1 else 0
        for letter in self.method.models[1:]:
            shape = self.sources[letter].shape(key)
            if shape == a_shape:
                continue
            if key == UNET_INPUT_CONV and shape[:1] + shape[2:] == a_shape[:1] + a_shape[2:] and shape[1] < a_shape[1]:
                narrowest = min(narrowest, shape[1])
                continue
            raise CheckpointError(
                f"{key} has shape {list(a_shape)} in model A and {list(shape)} in model {letter.upper()}: "
                "the models do not have the same architecture and cannot be merged"
            )
        if narrowest == (a_shape[1] if len(a_shape) > 1 else 0):
            return None
        self.channel_merge = True
        return narrowest

    # --- producing ------------------------------------------------------------------------------
    def _copier(self, source: TensorSource, key: str, entry: TensorEntry) -> Callable[[], Iterator[Tensor]]:
        def produce() -> Iterator[Tensor]:
            for start, stop in chunks(math.prod(entry.shape)):
                piece = get_flat_range(source, key, start, stop)
                yield piece if piece.dtype == entry.dtype else piece.to(entry.dtype)

        return produce

    def _load(self, letter: str, key: str, start: int, stop: int) -> Tensor:
        """Elements [start, stop) of `key` in model `letter`, in fp32 on the device.

        Pieces of element-wise merges go through buffers kept for the whole merge: allocating
        fresh memory for every piece costs more than the arithmetic (page faults).
        """
        count = stop - start
        if count > CHUNK_ELEMENTS:
            return get_flat_range(self.sources[letter], key, start, stop).to(self.device, torch.float32)
        if letter not in self._buffers:
            self._buffers[letter] = (
                torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.uint8),  # raw bytes, up to 8 per element
                torch.empty(CHUNK_ELEMENTS, dtype=torch.float32, device=self.device),
            )
        raw, work = self._buffers[letter]
        return work[:count].copy_(get_flat_range(self.sources[letter], key, start, stop, out=raw))

    def _elementwise(
        self, key: str, entry: TensorEntry, alpha: float, beta: float, context: KeyContext
    ) -> Callable[[], Iterator[Tensor]]:
        def produce() -> Iterator[Tensor]:
            for start, stop in chunks(math.prod(entry.shape)):
                inputs = [self._load(letter, key, start, stop) for letter in self.method.models]
                yield to_output(self._compute(inputs, alpha, beta, context), entry.dtype)

        return produce

    def _whole(
        self, key: str, entry: TensorEntry, alpha: float, beta: float, context: KeyContext, channels: int | None
    ) -> Callable[[], Iterator[Tensor]]:
        def produce() -> Iterator[Tensor]:
            inputs = [
                self._load(letter, key, 0, math.prod(self.sources[letter].shape(key))).reshape(
                    self.sources[letter].shape(key)
                )
                for letter in self.method.models
            ]
            if channels is None:
                result = self._compute(inputs, alpha, beta, context)
            else:  # merge the first `channels` input channels, keep A's others
                result = inputs[0].clone()
                narrow = [tensor[:, :channels] for tensor in inputs]
                result[:, :channels] = self._compute(narrow, alpha, beta, context)
            yield to_output(result, entry.dtype)

        return produce

    def _compute(self, inputs: list[Tensor], alpha: float, beta: float, context: KeyContext) -> Tensor:
        result = self.method.apply(inputs, alpha, beta, context)
        if self.config.weights_clip:
            result = clip_to_inputs(result, inputs)
        if any(result.data_ptr() == tensor.data_ptr() for tensor in inputs):
            result = result.clone()  # inputs live in reused buffers; the writer may still need the result
        return result


def _prefetcher(reads: list[tuple[TensorSource, str]]) -> Callable[[], None]:
    def start() -> None:
        for source, key in reads:
            prefetch(source, key)

    return start


def merge(
    config: MergeConfig,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken = None,
    known_sha256: Mapping[str, str] | None = None,
) -> MergeResult:
    """Merge the models `config` names into `config.out`; see the module docstring for the rules.

    `known_sha256` maps input paths to sha256 digests the caller already knows (a host's hash
    cache); the others are computed on a background thread during the merge. Raises UserError
    subclasses for bad inputs or settings, CancelledError when cancelled (no file is left behind).
    """
    start = time.perf_counter()
    config.validate()
    paths = config.models()
    with contextlib.ExitStack() as stack:
        sources = {letter: stack.enter_context(open_input(path)) for letter, path in paths.items()}
        families = {letter: family_of(source, f"model {letter.upper()}") for letter, source in sources.items()}
        warnings = check_same_family(families, paths)
        vae = stack.enter_context(open_input(config.vae)) if config.vae else None
        merger = _Merger(config, sources, families["a"], vae)
        outputs = merger.plan()
        warnings += [
            f"model {letter.upper()} ({paths[letter].name}) is a pickle: it was loaded whole into memory"
            for letter, source in sources.items()
            if is_loaded_whole(source)
        ]
        if merger.missing:
            warnings.append(
                f"{len(merger.missing)} keys of model A are missing from another input and were copied from A "
                f"(e.g. {merger.missing[0]})"
            )

        known = {str(Path(p).resolve()): h for p, h in (known_sha256 or {}).items()}
        tokens: dict[Path, str] = {}  # input file -> placeholder of its hash, computed during the merge
        hashes: dict[str, str | None] = {}
        for letter, path in paths.items():
            hashes[letter] = known.get(str(path.resolve()))
            if hashes[letter] is None and config.hash_inputs:
                hashes[letter] = tokens.setdefault(path, placeholder(HASH_WIDTH))
        inputs = [
            InputModel(path, sources[letter].metadata, hashes[letter], legacy_hash(path))
            for letter, path in paths.items()
        ]
        data_token = placeholder(HASH_WIDTH)
        metadata = merged_metadata(
            base=sources["a"].metadata if config.copy_metadata else None,
            recipe=_recipe(config, inputs, families["a"], merger.channel_merge),
            inputs=inputs,
            family=families["a"],
            title=Path(config.out).stem,
            data_hash=data_token,
            prediction_known=states_prediction(sources["a"].shapes(), sources["a"].metadata),
        )
        job = HashJob(tokens, cancel=cancel)
        stack.callback(job.stop)
        found: dict[Path, str] = {}

        def wait_for_hashes() -> None:
            found.update(job.result())
            hashes.update({letter: found[path] for letter, path in paths.items() if path in tokens and path in found})

        def values(data_sha256: str) -> dict[str, str]:
            return {data_token: data_sha256, **{token: found[path] for path, token in tokens.items()}}

        # two cores stay free: one for the writer, one for hashing the inputs
        with compute_threads(reserved=2 if tokens else 1):
            written = write_stream(
                config.out,
                outputs,
                metadata,
                what="the merge",
                placeholders=[data_token, *tokens.values()],
                values=values,
                progress=progress,
                cancel=cancel,
                before_finish=wait_for_hashes,
            )
    input_sha256 = {letter: value for letter, value in hashes.items() if value is not None}
    if config.copy_config:
        copy_model_config([paths[letter] for letter in ("a", "b", "c") if letter in paths], written.path)
    return MergeResult(
        path=written.path,
        data_sha256=written.data_sha256,
        input_sha256=input_sha256,
        metadata=written.metadata,
        size=written.size,
        seconds=time.perf_counter() - start,
        merged=merger.merged,
        copied=merger.copied,
        warnings=warnings,
    )


def _recipe(config: MergeConfig, inputs: list[InputModel], family: ModelFamily, channel_merge: bool) -> dict[str, Any]:
    hashes = [model.sha256 for model in inputs] + [None, None]
    recipe: dict[str, Any] = {
        "type": "sd-webui-training",
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2],
        "interp_method": config.method,
        "multiplier": config.alpha,
        "save_as_half": config.dtype == "fp16",
        "custom_name": Path(config.out).stem,
        "bake_in_vae": Path(config.vae).name if config.vae else None,
        "discard_weights": config.discard,
        "is_inpainting": channel_merge and family.is_inpainting,
        "is_instruct_pix2pix": channel_merge and family.is_instruct_pix2pix,
    }
    for name in (
        "beta",
        "blocks",
        "blocks_beta",
        "unet_alpha",
        "text_encoder_alpha",
        "vae_alpha",
        "density",
        "seed",
        "weights_clip",
        "include",
        "exclude",
        "prune_ema",
        "dtype",
    ):
        recipe[name] = getattr(config, name)
    return recipe
