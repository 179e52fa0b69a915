"""A JSON body without `Content-Type: application/json` is answered with a problem that names the header."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI

from tests.factories import ADMIN, unique_email


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path", ["/v1/contacts", "/v1/contacts/upsert"])  # upsert: app.fastpath's route too
async def test_a_json_body_without_its_content_type_is_a_415_naming_it(
    client: httpx.AsyncClient, path: str, content_type: str | None
) -> None:
    email = unique_email()
    headers = {**ADMIN, **({"Content-Type": content_type} if content_type else {})}
    response = await client.post(path, content=json.dumps({"email": email}).encode(), headers=headers)
    assert response.status_code == 415, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/unsupported-media-type")
    assert "Content-Type: application/json" in problem["detail"]
    assert (content_type or "no Content-Type") in problem["detail"]
    assert problem["errors"] == [{"field": "Content-Type", "message": problem["detail"],
                                  "code": "unsupported" if content_type else "missing"}]
    listed = await client.get("/v1/contacts", params={"email": email}, headers=ADMIN)
    assert listed.json()["data"] == []  # nothing was written


async def test_json_of_the_wrong_shape_is_still_a_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/contacts", json=[{"email": unique_email()}], headers=ADMIN)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"


async def test_a_json_suffix_media_type_is_json(client: httpx.AsyncClient) -> None:
    created = (await client.post("/v1/contacts", json={"email": unique_email()}, headers=ADMIN)).json()
    patched = await client.patch(f"/v1/contacts/{created['id']}", content=b'{"first_name": "Lou"}',
                                 headers={**ADMIN, "Content-Type": "application/merge-patch+json"})
    assert patched.status_code == 200 and patched.json()["first_name"] == "Lou"


def test_every_operation_with_a_json_body_documents_the_415(app: FastAPI) -> None:
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                assert list(operation["responses"]["415"]["content"]) == ["application/problem+json"], (method, path)
