"""Where each module of a kohya-format LoRA lives in a single-file (LDM) checkpoint, for SD1, SD2, SDXL.

A kohya LoRA names a module by a prefix and the module's path with "." replaced by "_":

- UNet, prefix `lora_unet`. SD1/SD2 LoRAs use the diffusers module paths
  (`down_blocks_0_attentions_0_proj_in`), SDXL LoRAs the LDM paths (`input_blocks_1_1_proj_in`);
  loaders accept either spelling for any family, and so does `targets_by_name`.
- Text encoders, prefix `lora_te` (SD1, SD2) or `lora_te1` / `lora_te2` (SDXL CLIP-L / bigG), with
  Hugging Face CLIP paths (`text_model_encoder_layers_0_self_attn_q_proj`, `mlp_fc1`, ...) even
  where the checkpoint stores the encoder in open_clip layout (SD2, SDXL bigG). There the q, k and
  v projections are rows of one fused `attn.in_proj_weight` [3W, W]: a target says which rows.

The diffusers <-> LDM block numbering assumes two ResBlocks per level (true of every SD family):
`down_blocks.i.(resnets|attentions).j` is `input_blocks.(1 + 3i + j).(0|1)`, the level's
downsampler `input_blocks.(3 + 3i).0.op`; `up_blocks.i.(resnets|attentions).j` is
`output_blocks.(3i + j).(0|1)` and its upsampler the `conv` at the end of `output_blocks.(3i + 2)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from lib_training.formats.detection import TEXT_ENCODERS, UNET_PREFIX
from lib_training.formats.family import Arch

UNET_LORA_PREFIX = "lora_unet"
_TE_LORA_PREFIXES: dict[Arch, tuple[str, ...]] = {
    Arch.SD1: ("lora_te",),
    Arch.SD2: ("lora_te",),
    Arch.SDXL: ("lora_te1", "lora_te2"),
}
_RESNET_RENAMES = {  # LDM ResBlock part -> diffusers ResnetBlock2D part
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_TOP_RENAMES = {  # LDM UNet module -> diffusers module, outside the blocks
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
_HF_TE_MODULE = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
_OPEN_CLIP_RENAMES = {  # open_clip layer part -> HF CLIP layer part
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)")
_TRANSFORMER_PART = re.compile(
    r"^(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$"
)
_CONV_PART = re.compile(
    r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\."
    r"(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)$"
)


@dataclass(frozen=True)
class LoraTarget:
    """One module a LoRA can change: its canonical kohya name and the checkpoint weight it changes."""

    name: str  # the name kohya writes for this family
    key: str  # checkpoint key of the weight, e.g. "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    shape: tuple[int, ...]  # the module's weight: [out, in] or [out, in, kh, kw]
    rows: tuple[int, int] | None = None  # rows of `key` it owns (q/k/v fused in open_clip in_proj_weight)
    aliases: tuple[str, ...] = ()  # other names LoRAs use for it
    component: str = "unet"  # "unet" or the text encoder slot ("clip_l", "clip_h", "clip_g")

    @property
    def is_conv3x3(self) -> bool:
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)

    @property
    def default(self) -> bool:
        """Whether kohya's plain LoRA trains it: text-encoder attention/MLP, UNet transformer layers."""
        return self.component != "unet" or bool(_TRANSFORMER_PART.match(self._unet_path))

    @property
    def conv(self) -> bool:
        """Whether LoCon (kohya `conv_dim`) adds it: ResBlock layers and the up/down samplers."""
        return self.component == "unet" and bool(_CONV_PART.match(self._unet_path))

    @property
    def _unet_path(self) -> str:
        return self.key[len(UNET_PREFIX) : -len(".weight")]


def diffusers_unet_path(ldm_path: str, blocks_per_level: int = 3) -> str | None:
    """The diffusers module path of an LDM UNet module path (without `.weight`), or None if it has none.

    `blocks_per_level`: LDM's input and output blocks per resolution level, ResBlocks per level + 1 (3 in
    SD1, SD2 and SDXL; see `unet_blocks_per_level`)."""
    if ldm_path in _TOP_RENAMES:
        return _TOP_RENAMES[ldm_path]
    parts = ldm_path.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    kind, number, rest = parts[0], int(parts[1]), parts[2:]
    if kind == "middle_block":  # middle_block.N.<module>: ResBlock, SpatialTransformer, ResBlock
        block = "mid_block.attentions.0" if number == 1 else f"mid_block.resnets.{number // 2}"
        return _in_block(block, number == 1, ".".join(rest))
    sub, tail = rest[0], ".".join(rest[1:])
    if not sub.isdigit() or not tail:
        return None
    sub_index = int(sub)
    if kind == "input_blocks" and number >= 1:
        level, j = divmod(number - 1, blocks_per_level)
        if j == blocks_per_level - 1:
            return f"down_blocks.{level}.downsamplers.0.conv" if tail == "op" else None
        return _in_block(f"down_blocks.{level}.{'attentions' if sub_index else 'resnets'}.{j}", sub_index == 1, tail)
    if kind == "output_blocks":
        level, j = divmod(number, blocks_per_level)
        if sub_index >= 1 and tail == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv"
        return _in_block(f"up_blocks.{level}.{'attentions' if sub_index else 'resnets'}.{j}", sub_index == 1, tail)
    return None


def unet_blocks_per_level(unet_paths: Iterable[str]) -> int:
    """LDM input blocks per level, read from a UNet's module paths: the first downsampler is
    input_blocks.N.0.op with N = ResBlocks per level + 1 (3 unless the model is built otherwise, as the tiny
    world's UNet with one ResBlock a level is)."""
    found = [int(m.group(1)) for p in unet_paths if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op", p))]
    return min(found) if found else 3


def _in_block(block: str, attention: bool, tail: str) -> str | None:
    if attention:
        return f"{block}.{tail}"
    for ldm, diffusers in _RESNET_RENAMES.items():
        if tail == ldm:
            return f"{block}.{diffusers}"
    return None


def _name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def lora_targets(shapes: Mapping[str, tuple[int, ...]], arch: Arch) -> list[LoraTarget]:
    """Every module of the checkpoint (given by its keys' shapes) that a kohya LoRA can change.

    UNet: every Linear and Conv weight. Text encoders: the attention projections and MLP layers.
    """
    targets: list[LoraTarget] = []
    unet_keys = [key for key in shapes if key.startswith(UNET_PREFIX) and key.endswith(".weight")]
    per_level = unet_blocks_per_level(key[len(UNET_PREFIX) : -len(".weight")] for key in unet_keys)
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".weight") and len(shape) in (2, 4):
            path = key[len(UNET_PREFIX) : -len(".weight")]
            ldm = _name(UNET_LORA_PREFIX, path)
            diffusers = diffusers_unet_path(path, per_level)
            names = [ldm] if diffusers is None else [_name(UNET_LORA_PREFIX, diffusers), ldm]
            if arch is Arch.SDXL:
                names.reverse()  # SDXL LoRAs spell the LDM path
            targets.append(LoraTarget(names[0], key, tuple(shape), aliases=tuple(names[1:])))
    for slot in TEXT_ENCODERS[arch]:
        targets.extend(text_encoder_targets(shapes, arch, slot.key))
    return targets


def text_encoder_targets(
    shapes: Mapping[str, tuple[int, ...]],
    arch: Arch,
    component: str,
    *,
    layout: Literal["hf", "open_clip"] | None = None,
    prefix: str | None = None,
) -> list[LoraTarget]:
    """The targets of one text encoder (`component`: "clip_l", "clip_h", "clip_g") among `shapes`.

    By default the keys are the checkpoint's: under the encoder's checkpoint prefix, spelled in
    the layout the checkpoint stores it in. `layout` and `prefix` read another spelling (a loaded
    model's module paths), giving the same names; each target's `key` is then the given key.
    """
    found = [(slot, name) for slot, name in zip(TEXT_ENCODERS[arch], _TE_LORA_PREFIXES[arch]) if slot.key == component]
    if not found:
        raise KeyError(f"{arch.value} models have no text encoder {component!r}")
    slot, lora_prefix = found[0]
    layout = slot.layout if layout is None else layout
    prefix = slot.prefix if prefix is None else prefix
    targets: list[LoraTarget] = []
    for key, shape in shapes.items():
        if key.startswith(prefix):
            targets.extend(_text_targets(key, key[len(prefix) :], tuple(shape), component, layout, lora_prefix))
    return targets


def _text_targets(
    key: str, part: str, shape: tuple[int, ...], component: str, layout: str, prefix: str
) -> Iterable[LoraTarget]:
    if layout == "hf":
        if not part.endswith(".weight"):
            return []
        path = part[: -len(".weight")]
        if not path.startswith("text_model."):  # very old SD1 files
            path = "text_model." + path
        if not _HF_TE_MODULE.fullmatch(path):
            return []
        return [LoraTarget(_name(prefix, path), key, shape, component=component)]
    # open_clip: "transformer.resblocks.N.attn.in_proj_weight" or "...mlp.c_fc.weight"
    path = part.removesuffix("_weight") if part.endswith("in_proj_weight") else part.removesuffix(".weight")
    found = _OPEN_CLIP_LAYER.fullmatch(path)
    if found is None:
        return []
    layer, module = found.groups()
    base = f"text_model.encoder.layers.{layer}"
    if module == "attn.in_proj":
        width = shape[0] // 3
        return [
            LoraTarget(
                _name(prefix, f"{base}.self_attn.{p}_proj"),
                key,
                (width, shape[1]),
                rows=(i * width, (i + 1) * width),
                component=component,
            )
            for i, p in enumerate("qkv")
        ]
    return [LoraTarget(_name(prefix, f"{base}.{_OPEN_CLIP_RENAMES[module]}"), key, shape, component=component)]


def targets_by_name(targets: Iterable[LoraTarget]) -> dict[str, LoraTarget]:
    """Each target under its canonical name and its aliases."""
    index: dict[str, LoraTarget] = {}
    for target in targets:
        for name in (target.name, *target.aliases):
            index[name] = target
    return index
