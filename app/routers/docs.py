"""`/docs`: Swagger UI from files installed with Carnet (fastapi-offline's copy of swagger-ui-dist), never a CDN.

It works offline and under a strict Content-Security-Policy, which these pages send themselves: no inline script
(the page's set-up is `/docs/init.js`), nothing loaded from another origin. URLs are relative, so the page also
works behind a proxy that serves Carnet under a path prefix.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles

__all__ = ["ASSETS", "CSP", "install"]

ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
# data: images are the icons swagger-ui.css draws inline; everything else comes from this origin only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Carnet API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/assets/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script>
</body>
</html>
"""

# The document's address is found from this script's own, so a path prefix added by a proxy is kept.
_INIT = """window.ui = SwaggerUIBundle({
  url: new URL("../openapi.json", document.currentScript.src).href,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
});
"""

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs_page() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers=_HEADERS)


@router.get("/docs/init.js")
async def docs_init() -> Response:
    return Response(_INIT, media_type="text/javascript", headers=_HEADERS)


def install(app: FastAPI) -> None:
    """The docs page, its set-up script and Swagger UI's files (the app is built with docs_url=None)."""
    app.include_router(router)
    app.mount("/docs/assets", StaticFiles(directory=ASSETS), name="docs-assets")
