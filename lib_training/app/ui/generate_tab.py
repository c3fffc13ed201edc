"""The Generate panel: try a result on the model with the preview sampler.

Results in the outputs are used as the hosts use them: embeddings by name in the prompt, other
methods' results by their tag (`<lora:NAME:0.8>`), see `TrainingService.generate`. The step,
guidance and sampler controls take their ranges from the training previews' settings, which use
the same sampler.
"""

from __future__ import annotations

import dataclasses
import html
import time
from collections.abc import Mapping
from typing import Any

import gradio as gr

from lib_training.app.service import TrainingService
from lib_training.app.ui.aesthetic_panel import build_aesthetic_panel
from lib_training.app.ui.compat import PRIVATE, QUICK
from lib_training.errors import UserError
from lib_training.model.sampler import LATENT_FACTOR, SampleSettings
from lib_training.options import describe
from lib_training.training.config import LoopConfig

MAX_SIDE = 2048


def sample_defaults(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`SampleSettings`' defaults, with `overrides`."""
    values = {f.name: f.default for f in dataclasses.fields(SampleSettings) if f.default is not dataclasses.MISSING}
    values.update(overrides or {})
    return values


def results_text(service: TrainingService) -> str:
    names = service.usable_names()
    if not names:
        return "No results in the outputs yet: train one in the Training tab."
    return "Results you can use in the prompt: " + ", ".join(f"`{name}`" for name in names)


def result_note(settings: SampleSettings, seconds: float, used: list[str]) -> str:
    """The line under a generated image: its size, seed and time, and which results it used
    ("embedding:NAME" becomes "embedding NAME", "lora:NAME:0.8" becomes "lora NAME at 0.8")."""
    note = f"{settings.width}x{settings.height}, seed {settings.seed}, {seconds:.1f} s. "
    if not used:
        return note + "No results used: write a result's name (or its tag) in the prompt to use it."
    named = []
    for entry in used:
        kind, _, rest = entry.partition(":")
        name, _, strength = rest.partition(":")
        named.append(f"{kind} {name}" + (f" at {strength}" if strength else ""))
    return note + "Results used: " + ", ".join(named) + "."


def build_generate_tab(service: TrainingService, defaults: Mapping[str, Any] | None = None) -> gr.Blocks:
    """The Generate panel. `defaults` overrides `SampleSettings`' defaults (prompt, width, ...)."""
    values = sample_defaults(defaults)
    preview = {info.name: info for info in describe(LoopConfig)}
    steps, cfg, sampler = preview["preview_steps"], preview["preview_cfg"], preview["preview_sampler"]
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row():
            with gr.Column(scale=3, min_width=360):
                prompt = gr.Textbox(values.get("prompt", ""), label="Prompt", lines=2, elem_id="sdwt-gen-prompt")
                negative = gr.Textbox(values["negative_prompt"], label="Negative prompt", lines=2)
                with gr.Row():
                    seed = gr.Number(values["seed"], label="Seed", precision=0)
                    sampler_box = gr.Dropdown(list(sampler.choices or ()), value=values["sampler"], label="Sampler")
                with gr.Row():
                    steps_box = gr.Slider(steps.min, steps.max, value=values["steps"], step=1, label="Steps")
                    cfg_box = gr.Slider(cfg.min, cfg.max, value=values["cfg_scale"], step=0.5, label="CFG scale")
                with gr.Row():
                    width = gr.Slider(
                        LATENT_FACTOR * 8, MAX_SIDE, value=values["width"], step=LATENT_FACTOR, label="Width"
                    )
                    height = gr.Slider(
                        LATENT_FACTOR * 8, MAX_SIDE, value=values["height"], step=LATENT_FACTOR, label="Height"
                    )
                with gr.Row():
                    names = gr.Markdown(results_text(service))
                    refresh = gr.Button("Refresh list", size="sm", min_width=120)
                aesthetic = build_aesthetic_panel(service.aesthetic)
            with gr.Column(scale=2, min_width=300):
                run = gr.Button("Generate", variant="primary", size="sm", elem_id="sdwt-gen-run")
                image = gr.Image(label="Image", interactive=False, height=384, elem_id="sdwt-gen-image")
                status = gr.HTML("", elem_id="sdwt-gen-status")

        def generate(*args: Any) -> list[Any]:
            text, neg, seed_value, sampler_name, step_count, scale, w, h = args[:8]
            started = time.perf_counter()
            try:
                settings = SampleSettings(
                    prompt=text or "",
                    negative_prompt=neg or "",
                    seed=int(seed_value or 0),
                    steps=int(step_count),
                    cfg_scale=float(scale),
                    width=int(w),
                    height=int(h),
                    sampler=sampler_name,
                )
                picture, used = service.generate(settings, aesthetic=aesthetic.request(*args[8:]))
            except UserError as error:
                return [gr.update(), f'<div class="sdwt-error">{html.escape(str(error))}</div>']
            note = result_note(settings, time.perf_counter() - started, used)
            return [picture, f'<div class="sdwt-info" data-sdwt-used="{len(used)}">{html.escape(note)}</div>']

        inputs = [prompt, negative, seed, sampler_box, steps_box, cfg_box, width, height, *aesthetic.inputs]
        run.click(generate, inputs, [image, status], **PRIVATE)
        refresh.click(lambda: results_text(service), None, [names], **QUICK)
        blocks.load(lambda: results_text(service), None, [names], **QUICK)  # fresh on every page load
    return blocks
