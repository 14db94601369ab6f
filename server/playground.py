"""The playground page (``/playground``): plain HTML, CSS and JavaScript modules shipped in the package
(``server/static/playground/``), no CDN and no build step (docs/playground.md).

The page itself is public: a browser opening ``/playground`` from its address bar cannot send an
``Authorization`` header, and the files hold nothing but code. The API calls it makes carry the key typed into
its key field, so the models stay behind the API's own key. Its responses forbid framing and any script or
connection to another origin (``Content-Security-Policy``), so the page only ever talks to this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

PLAYGROUND_PATH = "/playground"
PLAYGROUND_FILES = Path(__file__).resolve().parent / "static" / "playground"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def is_playground(path: str) -> bool:
    """The page and its files: served without a key (see the module docstring)."""
    return path == PLAYGROUND_PATH or path.startswith(PLAYGROUND_PATH + "/")


class PlaygroundFiles(StaticFiles):
    """The page's files, each answer with the security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_playground(app: FastAPI) -> None:
    app.mount(PLAYGROUND_PATH, PlaygroundFiles(directory=PLAYGROUND_FILES, html=True), name="playground")
