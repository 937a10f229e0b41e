"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) that work with no network.

FastAPI's own pages load their scripts and styles from a CDN, so on a machine without internet access they stay
blank. Here the same pages load them from this server: the files come from the ``fastapi-offline`` package
(part of the ``serve`` extra), which ships Swagger UI 5 (Apache-2.0) and ReDoc 2 (MIT) builds; its MIT licence
travels with its installed distribution. They are mounted at ``/docs-assets``, behind the same token as every
other page. Without that package the pages fall back to FastAPI's CDN assets, and say so in the log.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "add_docs", "assets_dir"]

log = logging.getLogger("nested_learning.service")

ASSETS_URL = "/docs-assets"
_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path | None:
    """The folder holding the Swagger UI and ReDoc builds, or None when the package is not installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in _FILES) else None


def add_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the two documentation pages on ``app`` (created with ``docs_url=None, redoc_url=None``)."""
    folder = assets_dir()
    if folder is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=folder), name="docs-assets")
        urls = {name: f"{ASSETS_URL}/{name}" for name in _FILES}
    else:
        log.warning("fastapi-offline is not installed: /docs and /redoc load their assets from a CDN "
                    "(pip install 'nested-learning[serve]')")
        urls = {"swagger-ui-bundle.js": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js",
                "swagger-ui.css": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css",
                "redoc.standalone.js": "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js",
                "favicon.png": "https://fastapi.tiangolo.com/img/favicon.png"}
    redirect_url = app.swagger_ui_oauth2_redirect_url

    def asset(name: str, root: str) -> str:  # a server behind a path prefix serves its own files under it
        return root + urls[name] if folder is not None else urls[name]

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - API docs",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            swagger_js_url=asset("swagger-ui-bundle.js", root),
            swagger_css_url=asset("swagger-ui.css", root),
            swagger_favicon_url=asset("favicon.png", root),
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if redirect_url:
        @app.get(redirect_url, include_in_schema=False)
        def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=asset("redoc.standalone.js", root),
            redoc_favicon_url=asset("favicon.png", root),
            with_google_fonts=folder is None,  # the fonts come from a CDN too; the system fonts do offline
        )
