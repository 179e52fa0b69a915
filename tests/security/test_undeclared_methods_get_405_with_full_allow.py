"""Class 9 (routing): a method a path does not serve is a 405 naming every method it serves, before any parameter.

The attack (issue 15, finding 9): `PATCH /v1/contacts/batch` and `PATCH /v1/segments/preview` were routed to
`PATCH /v1/contacts/{contact_id}` / `/v1/segments/{segment_id}` and answered 422 ("batch" is not an id): a client
learns the wrong thing, and a handler runs for a request no route declares. 405 and `OPTIONS` answers named the
methods of one route of the path, not all of them. Every path of the OpenAPI document is tried with every method it
does not declare, and with `OPTIONS`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.factories import ADMIN

DOCUMENT = json.loads((Path(__file__).resolve().parents[2] / "openapi" / "openapi.json").read_text())
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PATHS = {path: {m.upper() for m in item if m.upper() in (*METHODS, "OPTIONS")}
         for path, item in DOCUMENT["paths"].items()}
SOME_ID = "3f0c4a52-5d1e-4c8e-9b7a-2f6d8e1c0a9b"


def _allow(response: httpx.Response) -> set[str]:
    return {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}


def _concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", SOME_ID, template)


@pytest.mark.parametrize(("method", "path", "served"), [
    ("PATCH", "/v1/contacts/batch", {"POST"}),
    ("PATCH", "/v1/segments/preview", {"POST"}),
    ("GET", "/v1/contacts/upsert", {"POST"}),
    ("DELETE", "/v1/contacts/duplicates", {"GET"}),
    ("PUT", f"/v1/lists/{SOME_ID}/members/batch", {"POST"}),
])
async def test_a_literal_path_is_not_taken_for_an_id(client: httpx.AsyncClient, method: str, path: str,
                                                     served: set[str]) -> None:
    answer = await client.request(method, path, headers=ADMIN)
    assert answer.status_code == 405, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert _allow(answer) == served | {"OPTIONS"}


async def test_every_path_refuses_every_method_it_does_not_declare(client: httpx.AsyncClient) -> None:
    wrong = []
    for template, declared in PATHS.items():
        for method in sorted(set(METHODS) - declared):
            answer = await client.request(method, _concrete(template), headers=ADMIN)
            if answer.status_code != 405 or _allow(answer) != declared | {"OPTIONS"}:
                wrong.append(f"{method} {template}: {answer.status_code} Allow: {answer.headers.get('allow')}")
    assert not wrong, "\n".join(wrong)


async def test_options_names_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    wrong = []
    for template, declared in PATHS.items():
        answer = await client.options(_concrete(template))
        expected = 404 if "OPTIONS" in declared else 204  # the signup preflight answers itself: no such list
        if answer.status_code != expected or _allow(answer) != declared | {"OPTIONS"}:
            wrong.append(f"OPTIONS {template}: {answer.status_code} Allow: {answer.headers.get('allow')}")
    assert not wrong, "\n".join(wrong)
