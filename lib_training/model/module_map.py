"""The module map: every layer a method can hook, under one naming scheme for every host.

`DiffusionModel.module_map()` lists the live Linear (`layers.is_linear`: also Forge's own class) /
`nn.Conv2d` layers of the UNet (all of
them) and of each text encoder (the attention projections and MLP layers of every transformer
layer; the pooled-output projection is a bare tensor in open_clip layout and is not listed). Each
`ModuleEntry` is addressable three ways, the same whichever code loaded the model:

- by kohya LoRA name (`by_kohya`): the name kohya writes for the family (`lora_unet_down_blocks_0_…`
  for SD1/SD2, `lora_unet_input_blocks_1_1_…` for SDXL, `lora_te_…` / `lora_te1_…` / `lora_te2_…`
  for the text encoders), or the other UNet spelling loaders accept (`aliases`);
- by checkpoint key (`by_key`): the key of the weight in the family's single-file checkpoint,
  e.g. `model.diffusion_model.input_blocks.1.1.proj_in.weight`. The q, k and v projections of an
  open_clip tower share one key (`…attn.in_proj_weight`): each owns the rows `key_rows` of it;
- by kind (`select`): tags such as "cross_attn" + "attn_k" (see `UNET_KINDS` / `TEXT_KINDS`).

Names and keys come from `lib_training.formats.lora_keys`; this module only finds the live layer
behind each. Adapters say where the layers are with one `ModuleRoot` per component: a root module
whose `named_modules()` paths, in a known layout, continue the component's checkpoint prefix:

- "ldm": the UNet in LDM layout (ours, A1111's ldm/sgm `UNetModel`, Forge's
  `IntegratedUNet2DConditionModel`);
- "hf": a Hugging Face `CLIPTextModel` (A1111's CLIP-L; every tower in Forge, OpenCLIP ones too):
  separate `q_proj`, `k_proj`, `v_proj` Linears, so `rows` is None;
- "open_clip": an open_clip text tower (ours, A1111's OpenCLIP-H and bigG): q, k and v are rows of
  one fused `in_proj_weight` [3W, W] of an `nn.MultiheadAttention`, which is then the entry's
  `module`, and `rows` says which rows of it the entry owns.

So `kohya`, `aliases`, `key`, `key_rows`, `component`, `kinds`, `default`, `conv` and the feature
sizes (`spec()`) are the same for every host; `module`, `path` and `rows` are where the host keeps
the layer. Building the map only reads the modules.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lib_training.formats.detection import TEXT_ENCODERS, UNET_PREFIX, with_text_model_prefix
from lib_training.formats.family import Arch
from lib_training.formats.lora_keys import LoraTarget, lora_targets, text_encoder_targets
from lib_training.model.layers import is_linear

RootLayout = Literal["ldm", "hf", "open_clip"]
Shape = tuple[int, ...]

# Every tag `select` knows. UNet: where the layer is, what it is, its weight's kind.
UNET_KINDS = frozenset(
    {
        "input", "middle", "output",  # input_blocks / middle_block / output_blocks
        "transformer",  # inside a SpatialTransformer (kohya's plain LoRA set)
        "transformer_block",  # inside one of its BasicTransformerBlocks
        "proj", "proj_in", "proj_out",  # the SpatialTransformer's projections
        "self_attn", "cross_attn",  # attn1 / attn2
        "attn_q", "attn_k", "attn_v", "attn_out",  # to_q, to_k, to_v, to_out.0
        "ff",  # ff.net.0.proj (GEGLU), ff.net.2
        "resblock", "res_conv1", "res_conv2", "res_time_emb", "res_skip",  # in_layers.2 … skip_connection
        "sampler", "downsample", "upsample",  # input_blocks.N.0.op, output_blocks.N.M.conv
        "conv_in", "conv_out", "time_embed", "label_emb",  # outside the blocks
        "linear", "conv3x3", "conv1x1",  # the layer itself
    }
)  # fmt: skip
TEXT_KINDS = frozenset({"text_attention", "attn_q", "attn_k", "attn_v", "attn_out", "text_mlp", "fc1", "fc2", "linear"})
KINDS = UNET_KINDS | TEXT_KINDS

_UNET_LEAVES = {  # LDM module path ending -> kinds
    "to_q": {"attn_q"},
    "to_k": {"attn_k"},
    "to_v": {"attn_v"},
    "to_out.0": {"attn_out"},
    "ff.net.0.proj": {"ff"},
    "ff.net.2": {"ff"},
    "proj_in": {"proj", "proj_in"},
    "proj_out": {"proj", "proj_out"},
    "in_layers.2": {"resblock", "res_conv1"},
    "out_layers.3": {"resblock", "res_conv2"},
    "emb_layers.1": {"resblock", "res_time_emb"},
    "skip_connection": {"resblock", "res_skip"},
}
_UNET_PARTS = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
_UNET_TOP = {"input_blocks.0.0": "conv_in", "out.2": "conv_out"}
_TEXT_LEAVES = {  # HF CLIP layer part (in the kohya name) -> kinds
    "self_attn_q_proj": {"text_attention", "attn_q"},
    "self_attn_k_proj": {"text_attention", "attn_k"},
    "self_attn_v_proj": {"text_attention", "attn_v"},
    "self_attn_out_proj": {"text_attention", "attn_out"},
    "mlp_fc1": {"text_mlp", "fc1"},
    "mlp_fc2": {"text_mlp", "fc2"},
}
_TEXT_LEAF = re.compile(r"_layers_\d+_(self_attn_[qkvout]+_proj|mlp_fc[12])$")


@dataclass(frozen=True)
class ModuleRoot:
    """Where an adapter's model keeps one component's layers: `module.named_modules()` paths in
    `layout` continue the component's checkpoint prefix (see the module docstring)."""

    component: str  # "unet", "clip_l", "clip_h", "clip_g"
    module: nn.Module
    layout: RootLayout


@dataclass(frozen=True)
class ModuleEntry:
    """One hookable layer: its names, its kinds, and the live module of the host's model."""

    kohya: str  # the name kohya writes for this family
    aliases: tuple[str, ...]  # other spellings loaders accept (LDM vs diffusers UNet paths)
    key: str  # checkpoint key of the weight
    component: str  # "unet", "clip_l", "clip_h", "clip_g"
    kinds: frozenset[str]  # tags, see UNET_KINDS / TEXT_KINDS
    default: bool  # in kohya's plain LoRA set
    conv: bool  # added by LoCon (ResBlocks, up/down samplers)
    module: nn.Module = field(repr=False)  # the live Linear / Conv2d (fused q/k/v: the MultiheadAttention)
    rows: tuple[int, int] | None  # rows of module.in_proj_weight this entry owns (fused q/k/v), else None
    in_features: int
    out_features: int
    kernel: tuple[int, int] | None  # None for a Linear
    key_rows: tuple[int, int] | None = None  # rows of the checkpoint tensor at `key` (open_clip layout), else None
    path: str = ""  # the module's path under its ModuleRoot

    def weight(self) -> Tensor:
        """The live weight this entry owns: [out, in] or [out, in, kh, kw] (a view; rows of a fused one)."""
        if self.rows is None:
            return self.module.weight
        start, stop = self.rows
        return self.module.in_proj_weight[start:stop]

    def spec(self) -> tuple:
        """Everything but where the host keeps the layer: equal for every host's copy of a model."""
        return (
            self.kohya,
            self.aliases,
            self.key,
            self.key_rows,
            self.component,
            self.kinds,
            self.default,
            self.conv,
            self.in_features,
            self.out_features,
            self.kernel,
        )


class ModuleMap:
    """The entries of one model, in a fixed order (UNet first, then the text encoders)."""

    def __init__(self, entries: Iterable[ModuleEntry]) -> None:
        self._entries = list(entries)
        self._by_name: dict[str, ModuleEntry] = {}
        self._by_key: dict[str, list[ModuleEntry]] = {}
        for entry in self._entries:
            for name in (entry.kohya, *entry.aliases):
                if name in self._by_name:
                    raise ValueError(f"two modules are named {name!r}")
                self._by_name[name] = entry
            self._by_key.setdefault(entry.key, []).append(entry)

    def __iter__(self) -> Iterator[ModuleEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def by_kohya(self, name: str) -> ModuleEntry:
        """The entry of a kohya LoRA module name (canonical or alias)."""
        entry = self._by_name.get(name)
        if entry is None:
            raise KeyError(_not_found(f"no layer of this model is named {name!r}", name, self._by_name))
        return entry

    def by_key(self, key: str, rows: tuple[int, int] | None = None) -> ModuleEntry:
        """The entry of a checkpoint key; a fused open_clip `in_proj_weight` also needs `rows`."""
        entries = self._by_key.get(key)
        if entries is None:
            raise KeyError(_not_found(f"no layer of this model has the checkpoint key {key!r}", key, self._by_key))
        if rows is None and len(entries) == 1:
            return entries[0]
        for entry in entries:
            if entry.key_rows == rows:
                return entry
        if len(entries) == 1:
            raise KeyError(f"checkpoint key {key!r} is one layer's whole weight ({entries[0].kohya}); omit rows=")
        owners = ", ".join(f"{e.kohya} (rows {e.key_rows})" for e in entries)
        raise KeyError(f"checkpoint key {key!r} is shared by {owners}; pass rows=, or look them up by name")

    def entries_for_key(self, key: str) -> list[ModuleEntry]:
        """Every entry whose weight lives in the checkpoint tensor `key` (three for a fused in_proj)."""
        return list(self._by_key.get(key, ()))

    def select(
        self,
        *,
        component: str | None = None,
        kinds: Iterable[str] = (),
        default: bool | None = None,
        conv: bool | None = None,
    ) -> list[ModuleEntry]:
        """The entries with ALL the given kinds, of the component, in / out of the plain and LoCon sets."""
        wanted = frozenset([kinds] if isinstance(kinds, str) else kinds)
        unknown = sorted(wanted - KINDS)
        if unknown:
            raise ValueError(f"unknown module kinds {unknown}; known kinds: {sorted(KINDS)}")
        return [
            e
            for e in self._entries
            if (component is None or e.component == component)
            and wanted <= e.kinds
            and (default is None or e.default == default)
            and (conv is None or e.conv == conv)
        ]


def _not_found(message: str, wanted: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(wanted, list(known), n=3, cutoff=0.8)
    return f"{message}; did you mean {' or '.join(map(repr, close))}?" if close else message


# --- building ------------------------------------------------------------------------------------
def build_module_map(arch: Arch, roots: Iterable[ModuleRoot]) -> ModuleMap:
    """The map of a model of family `arch` whose layers are under `roots` (one per component)."""
    order = ["unet", *(slot.key for slot in TEXT_ENCODERS[arch])]
    entries: list[ModuleEntry] = []
    for root in sorted(roots, key=lambda r: order.index(r.component) if r.component in order else len(order)):
        found = _unet_entries(root, arch) if root.component == "unet" else _text_entries(root, arch)
        entries.extend(sorted(found, key=_canonical_order))  # hosts define their layers in different orders
    return ModuleMap(entries)


def _canonical_order(entry: ModuleEntry) -> tuple:
    """Checkpoint key with its numbers compared as numbers (input_blocks.2 before .10), then rows."""
    parts = re.split(r"(\d+)", entry.key)
    return tuple(int(p) if p.isdigit() else p for p in parts), entry.key_rows or (0, 0)


def _live_weights(root: nn.Module) -> tuple[dict[str, Shape], dict[str, tuple[nn.Module, str]]]:
    """Key of each layer weight under `root` (path + ".weight", fused: path + ".in_proj_weight") ->
    its shape, and -> (module, path)."""
    shapes: dict[str, Shape] = {}
    owners: dict[str, tuple[nn.Module, str]] = {}
    for path, module in root.named_modules():
        if is_linear(module) or isinstance(module, nn.Conv2d):
            key = f"{path}.weight"
            shapes[key], owners[key] = tuple(module.weight.shape), (module, path)
        elif isinstance(getattr(module, "in_proj_weight", None), Tensor):
            key = f"{path}.in_proj_weight"
            shapes[key], owners[key] = tuple(module.in_proj_weight.shape), (module, path)
    return shapes, owners


def _unet_entries(root: ModuleRoot, arch: Arch) -> list[ModuleEntry]:
    if root.layout != "ldm":
        raise ValueError(f"the UNet's modules must be given in LDM layout, not {root.layout!r}")
    shapes, owners = _live_weights(root.module)
    targets = lora_targets({UNET_PREFIX + key: shape for key, shape in shapes.items()}, arch)
    entries = []
    for target in targets:
        module, path = owners[target.key[len(UNET_PREFIX) :]]
        entries.append(_entry(target, target, module, path, _unet_kinds(target)))
    return entries


def _text_entries(root: ModuleRoot, arch: Arch) -> list[ModuleEntry]:
    slot = next((s for s in TEXT_ENCODERS[arch] if s.key == root.component), None)
    if slot is None or root.layout == "ldm":
        raise ValueError(f"{arch.value} models have no text encoder {root.component!r} in {root.layout!r} layout")
    shapes, owners = _live_weights(root.module)
    live = text_encoder_targets(shapes, arch, root.component, layout=root.layout, prefix="")
    stored_shapes = _checkpoint_shapes({t.key: shapes[t.key] for t in live}, root.layout, slot.layout)
    stored = {t.name: t for t in text_encoder_targets(_prefixed(slot.prefix, stored_shapes), arch, root.component)}
    if set(stored) != {t.name for t in live}:
        raise ValueError(f"the {root.component} text encoder's layers do not match its checkpoint layout")
    entries = []
    for target in live:
        module, path = owners[target.key]
        entries.append(_entry(stored[target.name], target, module, path, _text_kinds(target.name)))
    return entries


def _prefixed(prefix: str, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    return {prefix + key: shape for key, shape in shapes.items()}


def _checkpoint_shapes(shapes: Mapping[str, Shape], layout: str, stored_layout: str) -> dict[str, Shape]:
    """Shapes of a text tower's layer weights respelled from `layout` into the checkpoint's layout
    (the model code's own converters, run on meta tensors)."""
    if layout == stored_layout:
        return dict(shapes)
    from lib_training.model.networks.text_encoder import hf_to_open_clip, open_clip_to_hf

    convert = hf_to_open_clip if layout == "hf" else open_clip_to_hf
    tensors = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    if layout == "hf":
        tensors = with_text_model_prefix(tensors)
    return {key: tuple(tensor.shape) for key, tensor in convert(tensors).items()}


def _entry(stored: LoraTarget, live: LoraTarget, module: nn.Module, path: str, kinds: set[str]) -> ModuleEntry:
    """An entry named and keyed as the checkpoint (`stored`), for the live layer (`live`)."""
    shape = live.shape
    kernel = (int(shape[2]), int(shape[3])) if len(shape) == 4 else None
    kinds.add("linear" if kernel is None else f"conv{kernel[0]}x{kernel[1]}")
    return ModuleEntry(
        kohya=stored.name,
        aliases=stored.aliases,
        key=stored.key,
        component=stored.component,
        kinds=frozenset(kinds),
        default=stored.default,
        conv=stored.conv,
        module=module,
        rows=live.rows,
        in_features=int(shape[1]),
        out_features=int(shape[0]),
        kernel=kernel,
        key_rows=stored.rows,
        path=path,
    )


def _unet_kinds(target: LoraTarget) -> set[str]:
    path = target.key[len(UNET_PREFIX) : -len(".weight")]
    kinds: set[str] = set()
    if path in _UNET_TOP:
        kinds.add(_UNET_TOP[path])
    elif path.startswith(("time_embed.", "label_emb.")):
        kinds.add(path.split(".")[0])
    elif path.split(".")[0] in _UNET_PARTS:
        kinds.add(_UNET_PARTS[path.split(".")[0]])
    if target.default:
        kinds.add("transformer")
    if ".transformer_blocks." in path:
        kinds.add("transformer_block")
    if ".attn1." in path:
        kinds.add("self_attn")
    if ".attn2." in path:
        kinds.add("cross_attn")
    for leaf, tags in _UNET_LEAVES.items():
        if path.endswith("." + leaf):
            kinds |= tags
    if target.conv and path.endswith(".op"):
        kinds |= {"sampler", "downsample"}
    elif target.conv and path.endswith(".conv"):
        kinds |= {"sampler", "upsample"}
    return kinds


def _text_kinds(name: str) -> set[str]:
    found = _TEXT_LEAF.search(name)
    return set(_TEXT_LEAVES[found.group(1)]) if found else set()
