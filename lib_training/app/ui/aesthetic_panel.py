"""The aesthetic-gradients accordion of the Generate panel: the extension's controls and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from lib_training.aesthetic.personalise import AestheticSettings
from lib_training.app.aesthetic_service import AestheticRequest, AestheticService, clip_source
from lib_training.app.ui.compat import QUICK
from lib_training.errors import ConfigError

NONE = "None"


# The extension's infotext names, by the index of the input they restore.
INFOTEXT_NAMES = (
    "Aesthetic embedding", "Aesthetic weight", "Aesthetic steps", "Aesthetic LR", "Aesthetic slerp",
    "Aesthetic text", "Aesthetic slerp angle", "Aesthetic text negative",
)  # fmt: skip


@dataclass
class AestheticPanel:
    """The accordion's input components, in the order `request` takes their values."""

    inputs: list[Any]

    def infotext_fields(self) -> list[tuple[Any, str]]:
        """(component, infotext name) pairs: a WebUI's "send to txt2img" sets the controls from them."""
        return list(zip(self.inputs, INFOTEXT_NAMES))

    @staticmethod
    def request(*values: Any) -> AestheticRequest | None:
        """The request the controls describe; None when no embedding is chosen."""
        name, weight, steps, lr, use_slerp, text, angle, negative, clip_weights = values
        if not name or name == NONE:
            return None
        try:
            rate = float(lr)
        except (TypeError, ValueError):
            raise ConfigError(f"the aesthetic learning rate {lr!r} is not a number") from None
        settings = AestheticSettings(
            weight=float(weight), steps=int(steps), lr=rate, slerp=bool(use_slerp),
            slerp_angle=float(angle), text=text or "", text_negative=bool(negative),
        )  # fmt: skip
        return AestheticRequest([name], settings, clip_source(weights=(clip_weights or "").strip()))


def build_aesthetic_panel(aesthetic: AestheticService, elem_id: str = "sdwt-gen-aesthetic") -> AestheticPanel:
    """The accordion (closed), inside the current Blocks context."""
    d = AestheticSettings()
    with gr.Accordion("Aesthetic gradients", open=False, elem_id=elem_id):
        with gr.Row():
            weight = gr.Slider(0, 1, value=d.weight, step=0.01, label="Aesthetic weight")
            steps = gr.Slider(0, 50, value=d.steps, step=1, label="Aesthetic steps")
        with gr.Row():
            lr = gr.Textbox(str(d.lr), label="Aesthetic learning rate")
            use_slerp = gr.Checkbox(d.slerp, label="Slerp interpolation")
            names = gr.Dropdown([NONE, *aesthetic.names()], value=NONE, label="Aesthetic imgs embedding")
            refresh = gr.Button("Refresh", size="sm", min_width=80)
        with gr.Row():
            text = gr.Textbox(d.text, label="Aesthetic text for imgs")
            angle = gr.Slider(0, 1, value=d.slerp_angle, step=0.01, label="Slerp angle")
            negative = gr.Checkbox(d.text_negative, label="Is negative text")
        clip_weights = gr.Textbox(
            "",
            label="CLIP weights file (SD1 / SDXL CLIP-L only; empty: download ViT-L-14 once)",
            placeholder="open_clip_pytorch_model.bin or .safetensors of the CLIP model the embedding was made with",
        )
    refresh.click(lambda: gr.update(choices=[NONE, *aesthetic.names()]), None, [names], **QUICK)
    return AestheticPanel([names, weight, steps, lr, use_slerp, text, angle, negative, clip_weights])
