"""The web dashboard every node serves at `/`: static HTML, JS and CSS, no build step.

The page polls `GET /v1/topology` (404 on a manual-mode `dnet api`, which it handles) and
chats through `POST /v1/chat/completions`; it needs nothing else from the server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB_DIR = Path(__file__).parent
# Only the assets the page loads: the package directory also holds this module, and
# index.html is served at `/` (its relative links would break from /web/index.html).
ASSET_SUFFIXES = {".js", ".css", ".svg", ".png", ".ico"}


class _Assets(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        if Path(path).suffix not in ASSET_SUFFIXES:
            raise HTTPException(404)
        return await super().get_response(path, scope)


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at `/` and its assets under `/web/` (outside the API schema)."""

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        # no-cache: a node upgraded in place serves its new page on the next load.
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/web", _Assets(directory=WEB_DIR), name="web")
