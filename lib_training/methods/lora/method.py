"""LoRA, LoCon and DoRA training in kohya format (SD1, SD2, SDXL).

Which layers train: kohya's default set (every Linear / 1x1 conv of the UNet's transformer blocks),
with `locon` also the ResBlocks and the down/up samplers (their 3x3 convs at `conv_rank` /
`conv_alpha`), with `train_text_encoder` also the text encoders' attention and MLP layers (both
encoders on SDXL), at their own learning rate. The modules live in `network.py`; the file format in
`file.py`. A result applies at generation as `<lora:NAME:STRENGTH>`, and so does any kohya LoRA file.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor, nn

from lib_training.dataset import TrainingDataset
from lib_training.errors import CheckpointError, ConfigError, UserError
from lib_training.formats.embedding_files import EmbeddingFile, write_embedding
from lib_training.merge.blocks import BASE, block_of, parse_blocks
from lib_training.merge.dora import fitted_dora_scale
from lib_training.merge.lora_file import lora_tensors
from lib_training.methods.embedding import MAX_VECTORS, initial_vectors
from lib_training.methods.lora.file import (
    SAVE_DTYPES,
    ModuleWeights,
    RunFacts,
    bundle_tensors,
    bundled_vectors,
    lora_metadata,
    read_lora_file,
    tag_frequency,
    write_lora_file,
)
from lib_training.methods.lora.network import Dropout, LoraNetwork, LowRankModule, Target, conv_args, weight_of
from lib_training.methods.lora.targets import as_target, attentions_by_out_proj, model_layers, names_of
from lib_training.model.diffusion import DiffusionModel
from lib_training.model.module_map import ModuleEntry
from lib_training.options import option
from lib_training.seeding import derive_seed
from lib_training.training.config import LoopConfig
from lib_training.training.method import MethodSettings, MethodSpec, ParamGroup, TrainingMethod

_RNG_KEY = "rng_state"
_EMBEDDING_KEY = "pivotal"
_NO_INIT = torch.Generator()  # for modules whose values are loaded next (leaves the global RNG alone)


@dataclass
class LoraConfig(MethodSettings):
    """What to train: the network's layers, ranks and regularisation, and how to save it."""

    name: str = option(help="Name of the LoRA: its file name, used in prompts as <lora:NAME:0.8>.", flag="--name")
    rank: int = option(16, "Rank (kohya network_dim) of each module: more learns more detail, bigger files.", min=1)
    alpha: float = option(8.0, "Alpha (kohya network_alpha): the update is scaled by alpha / rank.", min=0.0)
    locon: bool = option(False, "LoCon: also train the ResBlocks and the down/up samplers (their 3x3 convs).")
    conv_rank: int = option(
        0, "Rank of the 3x3 convs with LoCon (kohya conv_dim); 0: the same as rank.", min=0, advanced=True
    )
    conv_alpha: float = option(0.0, "Alpha of the 3x3 convs with LoCon; 0: the same as alpha.", min=0.0, advanced=True)
    block_ranks: str = option(
        "",
        "Rank per block, as the merge tab's block weights: 26 values for SD1/SD2 (BASE = text encoders, "
        "IN00-IN11, M00, OUT00-OUT11) or 20 for SDXL; 0 leaves a block out. Empty: rank everywhere.",
        advanced=True,
    )
    block_lrs: str = option(
        "",
        "Learning-rate multiplier per block (26 or 20 values, or a block preset such as in_to_out); "
        "empty: the run's learning rate everywhere.",
        advanced=True,
        role="blocks",
    )
    dora: bool = option(False, "DoRA: also learn each weight's magnitude per input channel (dora_scale).")
    train_text_encoder: bool = option(
        False, "Also train the text encoders' attention and MLP layers (both encoders on SDXL)."
    )
    text_encoder_lr: str = option(
        "", "Learning rate of the text-encoder modules (empty: the run's learning rate).", advanced=True
    )
    dropout: float = option(0.0, "Dropout of the down projection's outputs while training.", min=0.0, max=0.99)
    rank_dropout: float = option(0.0, "Probability of dropping each rank per sample while training.", min=0.0, max=0.99)
    module_dropout: float = option(0.0, "Probability of skipping a module for a step.", min=0.0, max=0.99)
    pivotal_token: str = option(
        "",
        "Pivotal tuning: a new prompt word whose embedding trains together with the LoRA and is bundled in "
        "its file (A1111 loads it with <lora:...>); write it in the captions or template. Empty: none.",
    )
    pivotal_vectors: int = option(1, "Vectors of the pivotal word's embedding.", min=1, max=MAX_VECTORS)
    pivotal_init: str = option("*", "Text whose token embeddings start the pivotal word's vectors.", advanced=True)
    embedding_lr: str = option("0.005", "Learning rate of the pivotal word's embedding.", advanced=True)
    embedding_file: bool = option(
        False, "Also save the pivotal word's embedding as its own file TOKEN.safetensors (for ComfyUI).", advanced=True
    )
    save_dtype: str = option("fp16", "Precision of the saved file.", choices=tuple(SAVE_DTYPES))
    overwrite: bool = option(False, "Replace an existing LoRA of the same name in the output folder.")

    def check(self) -> None:
        super().check()
        if self.rank < 1:
            raise ConfigError(f"the rank must be at least 1 (got {self.rank}); 4 to 128 are usual")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be above 0 (got {self.alpha}); alpha = rank keeps the update unscaled")
        if (self.conv_rank or self.conv_alpha) and not self.locon:
            raise ConfigError(
                "a conv rank or conv alpha only applies to LoCon's 3x3 convs: turn on locon (--locon), "
                "or leave conv_rank and conv_alpha at 0"
            )
        if self.conv_rank < 0 or self.conv_alpha < 0:
            raise ConfigError("conv_rank and conv_alpha cannot be negative (0: the same as rank / alpha)")
        if self.text_encoder_lr.strip() and not self.train_text_encoder:
            raise ConfigError(
                "a text-encoder learning rate is set but the text encoders do not train: turn on "
                "train_text_encoder (--train-text-encoder), or clear text_encoder_lr"
            )
        for field_name in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, field_name)
            if not 0 <= value < 1:
                raise ConfigError(f"{field_name} must be at least 0 and below 1 (got {value})")
        token = self.pivotal_token
        if token and (not re.fullmatch(r"[^\s.<>:,()\[\]]+", token)):
            raise ConfigError(
                f"the pivotal word {token!r} must be one word without spaces, dots, commas, brackets or < > :"
            )
        if self.embedding_file and not token:
            raise ConfigError("embedding_file saves the pivotal word's embedding: set pivotal_token too")
        if self.embedding_file and token == self.name:
            raise ConfigError(
                f"the embedding file {token}.safetensors would replace the LoRA's file: choose a pivotal word "
                "other than the LoRA's name"
            )
        for field_name in ("block_ranks", "block_lrs"):
            values = [v for v in re.split(r"[,\s]+", getattr(self, field_name).strip()) if v]
            if len(values) > 1 and len(values) not in (20, 26):
                raise ConfigError(
                    f"{field_name} needs 26 comma-separated values for SD1/SD2 (BASE, IN00-IN11, M00, "
                    f"OUT00-OUT11) or 20 for SDXL (BASE, IN00-IN08, M00, OUT00-OUT08); got {len(values)}"
                )
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, not {self.save_dtype!r}")


def scaled_lr(schedule: str, factor: float) -> str:
    """A learning rate or schedule in the WebUI syntax ("0.005:100, 1e-3:1000, 1e-5") times `factor`."""
    if not schedule.strip():
        raise ConfigError("block learning rates need the run's learning rate")
    items = []
    for item in schedule.split(","):
        value, colon, until = item.strip().partition(":")
        try:
            scaled = float(value) * factor
        except ValueError:
            raise ConfigError(f"block learning rates cannot scale the learning rate {schedule!r}") from None
        items.append(f"{scaled:g}{colon}{until}")
    return ", ".join(items)


def chosen_layers(model: DiffusionModel, settings: LoraConfig) -> list[ModuleEntry]:
    """The layers `settings` train: kohya's default UNet set, LoCon's, the text encoders' if asked."""
    layers = model.module_map()
    chosen = layers.select(component="unet", default=True)
    if settings.locon:
        chosen += layers.select(component="unet", conv=True)
    if not chosen:
        raise UserError(
            "found no UNet layer a LoRA can adapt in this model (its transformer Linear layers were not recognised); "
            "this is a bug to report with the WebUI's name and version"
        )
    if settings.train_text_encoder:
        text = [entry for entry in layers.select(default=True) if entry.component != "unet"]
        if not text:
            raise UserError(
                "train_text_encoder is on, but no text-encoder layer a LoRA can adapt was found in this model (its "
                "Linear layers were not recognised); train without --train-text-encoder, and report this with the "
                "WebUI's name and version"
            )
        chosen += text
    return chosen


class LoraMethod(TrainingMethod):
    kind = "lora"
    settings_type = LoraConfig
    settings: LoraConfig

    def __init__(self, settings: LoraConfig) -> None:
        super().__init__(settings)
        self.network: LoraNetwork | None = None
        self._family: Any = None
        self._seed = 0
        self._run: RunFacts | None = None
        self._components: dict[str, str] = {}  # kohya name -> "unet", "clip_l", ...
        self._embeddings: dict[str, dict[str, Tensor]] = {}  # pivotal word -> encoder key -> [n, width]
        self._blocks: dict[str, str] = {}  # kohya name -> block ("BASE", "IN01", ...)
        self._block_lrs: dict[str, float] = {}
        self._loop_lr = ""

    # --- training -------------------------------------------------------------------------------
    def begin_run(self, dataset: TrainingDataset, loop: LoopConfig) -> None:
        self._seed = loop.seed
        self._loop_lr = loop.lr
        captions: dict[str, list[str]] = {}
        for record in dataset.samples:
            folder = str(PurePosixPath(record.relpath).parent)
            captions.setdefault(dataset.root.name if folder == "." else folder, []).append(record.caption)
        self._run = RunFacts(
            steps=loop.steps,
            started_at=time.time(),
            learning_rate=loop.lr,
            unet_lr=loop.lr,
            text_encoder_lr=(self.settings.text_encoder_lr or loop.lr) if self.settings.train_text_encoder else "",
            optimizer=loop.optimizer,
            lr_scheduler=loop.lr_scheduler,
            resolution=dataset.config.size,
            seed=loop.seed,
            noise_offset=loop.noise_offset,
            min_snr_gamma=loop.min_snr_gamma,
            mixed_precision=loop.precision,
            num_train_images=len(dataset),
            dataset_dirs={
                folder: {"n_repeats": dataset.config.repeats, "img_count": len(texts)}
                for folder, texts in captions.items()
            },
            tag_frequency=tag_frequency(captions),
        )

    def check_dataset(self, dataset: TrainingDataset) -> None:
        token = self.settings.pivotal_token
        if not token:
            return
        lines = [line.replace("[name]", self.name) for line in dataset.template.lines]
        in_captions = any("[filewords]" in line for line in lines) and any(
            re.search(rf"(?<!\w){re.escape(token)}(?!\w)", record.caption) for record in dataset.samples
        )
        if not in_captions and not any(re.search(rf"(?<!\w){re.escape(token)}(?!\w)", line) for line in lines):
            raise ConfigError(
                f"no training prompt contains the pivotal word {token!r}, so its embedding would not learn: "
                "write it in the captions (with a template using [filewords]) or in the template"
            )

    def attach(self, model: DiffusionModel) -> None:
        settings = self.settings
        if settings.pivotal_token:
            self._embeddings = {
                settings.pivotal_token: {
                    encoder.key: nn.Parameter(
                        initial_vectors(encoder, settings.pivotal_init, settings.pivotal_vectors).to(model.device)
                    )
                    for encoder in model.text_encoders
                }
            }
        layers = chosen_layers(model, settings)
        arch = model.family.arch
        parsed = parse_blocks(settings.block_ranks, arch)
        if any(value < 0 or value != int(value) for value in parsed.values()):
            raise ConfigError("block ranks must be whole numbers, at least 0 (0 leaves a block out)")
        block_ranks = {block: int(value) for block, value in parsed.items()}
        self._block_lrs = parse_blocks(settings.block_lrs, arch)
        self._blocks = {entry.kohya: block_of(entry.key, arch) or BASE for entry in layers}
        layers = [entry for entry in layers if block_ranks.get(self._blocks[entry.kohya], 1) > 0]
        attentions = attentions_by_out_proj(model)
        init = torch.Generator().manual_seed(derive_seed(self._seed, "lora-init"))
        modules: dict[str, LowRankModule] = {}
        targets: dict[str, Target] = {}
        for entry in sorted(layers, key=lambda e: e.kohya):
            target = as_target(entry, attentions)
            weight = weight_of(target)
            conv3x3 = weight.ndim == 4 and tuple(weight.shape[2:]) != (1, 1)
            rank = block_ranks.get(self._blocks[entry.kohya], settings.rank)
            rank = (settings.conv_rank or rank) if conv3x3 else rank
            alpha = (settings.conv_alpha or settings.alpha) if conv3x3 else settings.alpha
            module = LowRankModule(
                weight.shape,
                rank,
                alpha,
                conv=conv_args(target.layer),
                dora_from=weight.detach() if settings.dora else None,
                generator=init,
            )
            modules[entry.kohya] = module.to(model.device)
            targets[entry.kohya] = target
        self._components = {entry.kohya: entry.component for entry in layers}
        rng = torch.Generator(device=model.device).manual_seed(derive_seed(self._seed, "lora-dropout"))
        network = LoraNetwork(modules, targets, rng)
        network.dropout = Dropout(settings.dropout, settings.rank_dropout, settings.module_dropout)
        network.train()
        network.attach()
        self.network = network
        self._family = model.family

    def detach(self) -> None:
        if self.network is not None:
            self.network.detach()

    def param_groups(self) -> list[ParamGroup]:
        """ "unet" and "text_encoder" (its own learning rate), "embedding" (pivotal tuning); with block
        learning rates one group per block instead ("unet.IN01", ..., "text_encoder")."""
        if self.network is None:
            return []
        groups: dict[str, list[nn.Parameter]] = {}
        lrs: dict[str, str | None] = {}
        for name, module in self.network.lora.items():
            block = self._blocks.get(name, BASE)
            if self._components[name] != "unet":
                group, lr = "text_encoder", self.settings.text_encoder_lr or None
                if lr is None and block in self._block_lrs:
                    lr = scaled_lr(self._loop_lr, self._block_lrs[block])
            elif self._block_lrs:
                group, lr = f"unet.{block}", scaled_lr(self._loop_lr, self._block_lrs.get(block, 1.0))
            else:
                group, lr = "unet", None
            groups.setdefault(group, []).extend(module.parameters())
            lrs[group] = lr
        result = [ParamGroup(group, params, lrs[group]) for group, params in groups.items()]
        vectors = [v for parts in self._embeddings.values() for v in parts.values() if isinstance(v, nn.Parameter)]
        if vectors:
            result.append(ParamGroup("embedding", vectors, self.settings.embedding_lr or None))
        return result

    @property
    def trains_text_encoders(self) -> bool:
        return self.settings.train_text_encoder or bool(self.settings.pivotal_token)

    def prompt_embeddings(self) -> Mapping[str, Mapping[str, Tensor]]:
        return self._embeddings

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if self.network is None:
            return {}
        state = {key: value.detach().cpu().clone() for key, value in self.network.lora.state_dict().items()}
        state[_RNG_KEY] = self.network.rng.get_state()
        for token, parts in self._embeddings.items():
            state.update({f"{_EMBEDDING_KEY}.{token}.{key}": v.detach().cpu().clone() for key, v in parts.items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        own = self.state_dict()
        if set(state) != set(own):
            raise ValueError(f"resume state has {len(state)} tensors, the LoRA has {len(own)}: other settings")
        assert self.network is not None
        own_keys = {k for k in state if k != _RNG_KEY and not k.startswith(_EMBEDDING_KEY + ".")}
        self.network.lora.load_state_dict({k: state[k] for k in own_keys})
        self.network.rng.set_state(state[_RNG_KEY])
        for token, parts in self._embeddings.items():
            for key, vectors in parts.items():
                vectors.data.copy_(state[f"{_EMBEDDING_KEY}.{token}.{key}"])

    # --- results ----------------------------------------------------------------------------------
    def module_weights(self) -> dict[str, ModuleWeights]:
        """The modules as the file holds them (by kohya name)."""
        assert self.network is not None
        weights = {}
        for name, module in self.network.lora.items():
            target = self.network.targets[name]
            down, up = module.down, module.up
            if isinstance(target.layer, nn.MultiheadAttention) and down.ndim == 4:
                down, up = down.flatten(1), up.flatten(1)
            weights[name] = ModuleWeights(down, up, module.alpha, module.dora_scale)
        return weights

    def save(self, path: Path, step: int, metadata: Mapping[str, str]) -> None:
        settings = self.settings
        args: dict[str, str] = {}
        if settings.locon:
            args.update(
                conv_dim=str(settings.conv_rank or settings.rank), conv_alpha=str(settings.conv_alpha or settings.alpha)
            )
        for field_name in ("dropout", "rank_dropout", "module_dropout"):
            if getattr(settings, field_name):
                args[field_name] = str(getattr(settings, field_name))
        module = "networks.lora"
        if settings.dora:  # DoRA files come from LyCORIS in the kohya ecosystem
            module = "lycoris.kohya"
            args.update(algo="lora", dora_wd="True")
        network = {"module": module, "dim": settings.rank, "alpha": settings.alpha, "args": args}
        meta = lora_metadata(
            name=self.name,
            family=self._family,
            network=network,
            run=self._run,
            step=step,
            model_name=metadata.get("sd_checkpoint_name", ""),
            model_hash=metadata.get("sd_checkpoint", ""),
        )
        tensors = lora_tensors(self.module_weights(), SAVE_DTYPES[settings.save_dtype])
        for token, parts in self._embeddings.items():
            tensors.update(bundle_tensors(token, parts))
        write_lora_file(path, tensors, {**metadata, **meta})
        if settings.embedding_file:
            for token, parts in self._embeddings.items():
                vectors = {key: v.detach().cpu() for key, v in parts.items()}
                embedding = EmbeddingFile(token, vectors, step, {"sd_checkpoint_family": self._family.name})
                write_embedding(Path(path).with_name(f"{token}.safetensors"), embedding, overwrite=True)

    @classmethod
    def load(cls, path: Path, model: DiffusionModel) -> LoraMethod:
        """Any kohya LoRA / LoCon / DoRA file, its modules matched to `model`'s layers by name."""
        path = Path(path)
        loaded = read_lora_file(path)
        index = names_of(model_layers(model))
        unknown = [name for name in loaded.modules if name not in index]
        if unknown:
            raise CheckpointError(
                f"{path.name}: {len(unknown)} of its {len(loaded.modules)} modules have no layer in this "
                f"{model.family.describe()} model (e.g. {unknown[0]}); the LoRA was made for another model family"
            )
        attentions = attentions_by_out_proj(model)
        modules: dict[str, LowRankModule] = {}
        targets: dict[str, Target] = {}
        for name, weights in loaded.modules.items():
            entry = index[name]
            target = as_target(entry, attentions)
            shape = tuple(weight_of(target).shape)
            got = (int(weights.up.shape[0]), *weights.down.shape[1:])
            if math.prod(got) != math.prod(shape) or got[0] != shape[0]:
                raise CheckpointError(
                    f"{path.name}: module {name} changes a weight of shape {list(got)} but the model's is "
                    f"{list(shape)}; the LoRA was made for another model"
                )
            rank = int(weights.down.shape[0])
            module = LowRankModule(shape, rank, weights.alpha, conv=conv_args(target.layer), generator=_NO_INIT)
            with torch.no_grad():
                module.down.copy_(weights.down.reshape(module.down.shape))
                module.up.copy_(weights.up.reshape(module.up.shape))
                if weights.dora_scale is not None:
                    module.dora_scale = nn.Parameter(fitted_dora_scale(weights.dora_scale.float(), shape))
            modules[entry.kohya] = module.to(model.device).requires_grad_(False)
            targets[entry.kohya] = target
        method = cls(LoraConfig(name=path.stem))
        encoder_keys = [encoder.key for encoder in model.text_encoders]
        method._embeddings = {
            token: {k: v.to(model.device) for k, v in bundled_vectors(parts, encoder_keys).items()}
            for token, parts in loaded.bundles.items()
        }
        method.network = LoraNetwork(modules, targets, torch.Generator(device=model.device)).eval()
        method._family = model.family
        method._components = {name: index[name].component for name in modules}
        return method

    @contextlib.contextmanager
    def apply_for_generation(self, model: DiffusionModel, strength: float = 1.0) -> Iterator[dict[str, Any]]:
        network = self.network
        if network is None:
            raise RuntimeError("the LoRA has no modules: attach or load it first")
        was_attached, was_training, multiplier = network.attached, network.training, network.multiplier
        network.multiplier = strength
        network.eval()
        try:
            if not was_attached:
                network.attach()
            yield {token: {k: v.detach() for k, v in parts.items()} for token, parts in self._embeddings.items()}
        finally:
            if not was_attached:
                network.detach()
            network.multiplier = multiplier
            network.train(was_training)


SPEC = MethodSpec(
    method=LoraMethod,
    title="LoRA",
    summary="LoRA, LoCon and DoRA in kohya format (SD1, SD2, SDXL)",
    result_role="loras",
    prompt_tag="lora",
    loop_defaults={"lr": "0.0001"},
    data_defaults={"template": "filewords"},
)
