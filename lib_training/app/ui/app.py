"""The standalone app: the tabs in one page and the HTTP API, on one FastAPI application.

    /                    the Gradio page: Training, Generate and Merge tabs
    /training/v1/...     the HTTP API (`lib_training.app.api`)
    /docs, /openapi.json the API's documentation (Swagger UI served locally: `api_docs`) and schema

The app plays the host: it injects `javascript/sdwt-training.js` and `style.css` itself, which
A1111 and Forge do for an extension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gradio as gr
from fastapi import FastAPI

from lib_training.app.api import build_router
from lib_training.app.api_docs import add_local_docs
from lib_training.app.service import TrainingService
from lib_training.app.ui import assets
from lib_training.app.ui.compat import run_script_on_load
from lib_training.app.ui.generate_tab import build_generate_tab
from lib_training.app.ui.merge_tab import build_merge_tab
from lib_training.app.ui.page_client import QuietPage
from lib_training.app.ui.training_tab import build_training_tab

TITLE = "sd-webui-training"
# System fonts only: the page works offline (Gradio's default theme loads web fonts).
SANS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"]
MONO = ["ui-monospace", "SFMono-Regular", "Consolas", "monospace"]


def build_blocks(
    service: TrainingService,
    presets: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    generate_defaults: Mapping[str, Any] | None = None,
) -> gr.Blocks:
    """The standalone page: a header naming the model, then the Training, Generate and Merge tabs."""
    # Built outside the page's context and rendered into it, as A1111 and Forge do with a tab.
    tabs = [
        ("Training", "sdwt-tab-training", build_training_tab(service, presets)),
        ("Generate", "sdwt-tab-generate", build_generate_tab(service, generate_defaults)),
        ("Merge", "sdwt-tab-merge", build_merge_tab(service)),
    ]
    theme = gr.themes.Default(font=SANS, font_mono=MONO)
    with QuietPage(title=TITLE, css=assets.style(), theme=theme, analytics_enabled=False) as blocks:
        gr.Markdown(
            f"## {TITLE}\nModel: `{service.workspace.describe_model()}` · API: [/docs](/docs)",
            elem_id="sdwt-header",
        )
        with gr.Tabs(selected=tabs[0][1], elem_id="sdwt-tabs"):  # `selected`: no console warning per tab
            for title, elem_id, tab in tabs:
                with gr.Tab(title, id=elem_id, elem_id=elem_id):
                    tab.render()
        run_script_on_load(blocks, assets.script())
    return blocks


def build_app(
    service: TrainingService,
    presets: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    generate_defaults: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The FastAPI application: the API router, then the page mounted at "/"."""
    app = FastAPI(
        title=TITLE,
        description="Training and merging for Stable Diffusion: HTTP API.",
        docs_url=None,  # FastAPI's page loads Swagger UI from a CDN: ours serves it locally
        redoc_url=None,
    )
    add_local_docs(app)
    app.include_router(build_router(service))
    blocks = build_blocks(service, presets, generate_defaults)
    blocks.queue()  # Generate runs on the queue; the training tab's events bypass it
    blocks.show_api = False  # no "Use via API" link to Gradio's own API page: ours is at /docs
    return gr.mount_gradio_app(app, blocks, path="/")
