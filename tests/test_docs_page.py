"""/docs works offline and under a strict CSP: every file it needs is served by Carnet itself, no inline script."""

from __future__ import annotations

import re

import httpx


async def test_docs_page_loads_only_its_own_files(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp

    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and not [s for s in sources if "//" in s]  # nothing from another origin (no CDN)
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) == []  # no inline script for the CSP to refuse
    types = {}
    for source in sources:
        asset = await client.get(f"/{source}")  # relative to /docs, as the browser resolves them
        assert asset.status_code == 200, source
        types[source.rsplit(".", 1)[-1]] = asset.headers["content-type"].split(";")[0]
        if source.endswith("swagger-ui-bundle.js"):
            assert "SwaggerUIBundle" in asset.text and 'PACKAGE_VERSION:"5.' in asset.text  # 5.x reads OpenAPI 3.1
        if source.endswith("init.js"):
            assert '"../openapi.json"' in asset.text
    assert types == {"css": "text/css", "png": "image/png", "js": "text/javascript"}
    assert (await client.get("/openapi.json")).status_code == 200


async def test_no_page_is_left_that_needs_a_cdn(client: httpx.AsyncClient) -> None:
    assert (await client.get("/redoc")).status_code == 404  # ReDoc's page was CDN-only too
    assert "/docs" not in (await client.get("/openapi.json")).json()["paths"]
