"""The API's documentation page (/docs) served from this machine, so it works offline.

FastAPI's own /docs page loads Swagger UI from a CDN and stays blank without internet. Here the
page's script, style sheet and icon come from the `swagger-ui-bundle` package (a Python package that
ships Swagger UI's files), served under /docs/assets. Without that package /docs says how to get it
and links the raw schema, instead of showing a blank page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"


def swagger_ui_folder() -> Path | None:
    """The folder of Swagger UI's files from the `swagger-ui-bundle` package, or None without it."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    folder = Path(str(swagger_ui_path))
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def add_local_docs(app: FastAPI) -> None:
    """Serve /docs with local assets. `app` must be made with `docs_url=None` (no CDN page)."""
    folder = swagger_ui_folder()
    title = f"{app.title}: HTTP API"
    if folder is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=folder), name="swagger-ui-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def docs() -> HTMLResponse:
        if folder is None:
            return HTMLResponse(
                f"<!doctype html><title>{title}</title><p>The API documentation page needs the "
                "<code>swagger-ui-bundle</code> package: <code>pip install swagger-ui-bundle</code>. "
                f'Meanwhile, the API\'s schema is at <a href="{app.openapi_url}">{app.openapi_url}</a>.</p>'
            )
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
        )
