"""Classes 8 and 11: a segment writer learns nothing of the attribute definitions its scopes do not let it read.

The attack: a token narrowed to `segments:write` (an agency building audiences), without `contacts:read`, the
scope attribute definitions are read with (`GET /v1/attributes`), saves a segment whose filter names
`attributes.<guess>`. An unknown name was a 422 `unknown_attribute`, a defined one a 201 (and the ops a 422 listed
followed the attribute's type): name by name, the token read the catalogue. Such a filter is now a 403 naming
`contacts:read`, the same whether the attribute exists or not; a token with the scope still gets the 422.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from app.security import Role, Scope
from tests.auth import bearer
from tests.factories import ADMIN, make_attribute
from tests.routers.test_segments import make_segment

SEGMENT_WRITER = bearer(Role.MANAGER, subject="agency@shop.example",
                        scopes={Scope.SEGMENTS_READ, Scope.SEGMENTS_WRITE})
# The same, let read contacts (and so the attribute definitions).
CONTACT_READER = bearer(Role.MANAGER, subject="agency@shop.example",
                        scopes={Scope.SEGMENTS_READ, Scope.SEGMENTS_WRITE, Scope.CONTACTS_READ})


def _on(name: str, op: str = "eq", value: Any = "gold") -> dict[str, Any]:
    return {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"},
                    {"field": f"attributes.{name}", "op": op, "value": value}]}


def _answer(response: httpx.Response) -> tuple[int, Any]:
    """What the token sees, less what differs on every call (the problem's instance, the segment's id)."""
    body = response.json()
    return response.status_code, {k: v for k, v in body.items() if k not in ("instance", "request_id")}


async def test_a_segment_writer_cannot_tell_a_defined_attribute_from_an_unknown_one(
    client: httpx.AsyncClient,
) -> None:
    defined = f"tier_{uuid.uuid4().hex[:6]}"
    await make_attribute(client, defined, "enum", options=["gold", "silver"])
    unknown = f"tier_{uuid.uuid4().hex[:6]}"
    for name, op in ((defined, "eq"), (unknown, "eq"), (defined, "gt"), (unknown, "gt")):
        body = {"name": f"probe-{uuid.uuid4().hex[:8]}", "filter": _on(name, op)}
        created = await client.post("/v1/segments", json=body, headers=SEGMENT_WRITER)
        assert created.status_code == 403, (name == defined, op, created.status_code, created.text)
        assert _answer(created) == (403, {
            "type": created.json()["type"], "title": "The token lacks a required scope", "status": 403,
            "detail": "a filter on attributes.* tells which attributes are defined and their types: "
                      "contacts:read is needed", "missing_scopes": ["contacts:read"]}), (name, op, created.text)
        assert defined not in created.text
    segment = await make_segment(client, {"field": "address.city", "op": "eq", "value": "Lyon"})
    path = f"/v1/segments/{segment['id']}"
    probes = [await client.patch(path, json={"filter": _on(name)}, headers=SEGMENT_WRITER)
              for name in (defined, unknown)]
    assert _answer(probes[0]) == _answer(probes[1]) and probes[0].status_code == 403
    # nothing was saved
    assert (await client.get(path, headers=ADMIN)).json()["filter"] == segment["filter"]


async def test_a_token_that_reads_contacts_still_gets_the_field_errors(client: httpx.AsyncClient) -> None:
    defined = f"tier_{uuid.uuid4().hex[:6]}"
    await make_attribute(client, defined, "enum", options=["gold", "silver"])
    unknown = f"tier_{uuid.uuid4().hex[:6]}"
    made = await client.post("/v1/segments", json={"name": f"s-{uuid.uuid4().hex[:8]}", "filter": _on(defined)},
                             headers=CONTACT_READER)
    assert made.status_code == 201, made.text
    refused = await client.post("/v1/segments", json={"name": f"s-{uuid.uuid4().hex[:8]}", "filter": _on(unknown)},
                                headers=CONTACT_READER)
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["code"] == "unknown_attribute"
    # the preview needs contacts:read for its members anyway: without it, a 403 whatever the filter names
    for name in (defined, unknown):
        preview = await client.post("/v1/segments/preview", json={"filter": _on(name)}, headers=SEGMENT_WRITER)
        assert preview.status_code == 403 and preview.json()["missing_scopes"] == ["contacts:read"], preview.text
