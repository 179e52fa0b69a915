"""Class 4: a stored response is replayed only to the token that received it (issue 15, finding 4).

The attack: token A (with `pii:read`) sends a request with `Idempotency-Key: K`; token B of the same subject,
without `pii:read`, sends the same key and body, and is handed A's stored, unmasked answer. Every route that
takes an Idempotency-Key is tried (the table must cover each one the OpenAPI document declares).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI

from app.security import Role, Scope
from tests.auth import bearer
from tests.factories import PROOF, make_contact, make_list, unique_email

SUBJECT = "backoffice@shop.example"
OWNER = bearer(Role.ADMIN, subject=SUBJECT)                                              # token A
MASKED = bearer(Role.ADMIN, subject=SUBJECT, scopes=set(Scope) - {Scope.PII_READ})     # token B: same subject

Request = tuple[str, dict[str, Any]]      # path, httpx keyword arguments (json= or files=)
Builder = Callable[[httpx.AsyncClient], Awaitable[Request]]


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _event(email: str) -> dict[str, Any]:
    return {"contact": {"email": email}, "type": "page_view", "occurred_at": datetime.now(UTC).isoformat()}


async def _consent(client: httpx.AsyncClient) -> Request:
    contact = await make_contact(client)
    return f"/v1/contacts/{contact['id']}/consents", {"json": {
        "purpose": "email_marketing", "action": "granted", "source": "newsletter_form", "proof": PROOF}}


async def _merge(client: httpx.AsyncClient) -> Request:
    keeper, duplicate = await make_contact(client), await make_contact(client, last_name="Martin")
    return f"/v1/contacts/{keeper['id']}/merge", {"json": {"duplicate_id": duplicate["id"]}}


async def _members(client: httpx.AsyncClient) -> Request:
    news, person = await make_list(client), await make_contact(client)
    return f"/v1/lists/{news['id']}/members/batch", {"json": {"remove": [person["id"]]}}


async def _fixed(path: str, body: dict[str, Any]) -> Request:
    return path, {"json": body}


ROUTES: dict[str, Builder] = {
    "/v1/attributes": lambda c: _fixed("/v1/attributes", {"name": _name("attr"), "type": "text"}),
    "/v1/contacts": lambda c: _fixed("/v1/contacts", {"email": unique_email(), "first_name": "Claire"}),
    "/v1/contacts/batch": lambda c: _fixed("/v1/contacts/batch", {"items": [{"email": unique_email()}]}),
    "/v1/contacts/upsert": lambda c: _fixed("/v1/contacts/upsert", {"email": unique_email(), "last_name": "Martin"}),
    "/v1/contacts/{contact_id}/consents": _consent,
    "/v1/contacts/{contact_id}/merge": _merge,
    "/v1/destinations": lambda c: _fixed("/v1/destinations", {
        "name": _name("hook"), "kind": "webhook", "config": {"url": "https://hooks.example.com/carnet"}}),
    "/v1/events": lambda c: _fixed("/v1/events", _event(unique_email())),
    "/v1/events/batch": lambda c: _fixed("/v1/events/batch", {"items": [_event(unique_email())]}),
    "/v1/imports": lambda c: _fixed_upload(),
    "/v1/lists": lambda c: _fixed("/v1/lists", {"name": _name("list")}),
    "/v1/lists/{list_id}/members/batch": _members,
    "/v1/segments": lambda c: _fixed("/v1/segments", {
        "name": _name("seg"), "filter": {"field": "kind", "op": "eq", "value": "customer"}}),
    "/v1/tags": lambda c: _fixed("/v1/tags", {"name": _name("tag")}),
    "/v1/tokens": lambda c: _fixed("/v1/tokens", {"subject": "intern@shop.example", "role": "viewer"}),
}


async def _fixed_upload() -> Request:
    csv = f"E-mail;Nom\n{unique_email()};Martin\n".encode()
    return "/v1/imports", {"files": {"file": ("clients.csv", csv, "text/csv")}}


def test_every_idempotency_key_route_is_attacked(app: FastAPI) -> None:
    declared = {path for path, operations in app.openapi()["paths"].items() for operation in operations.values()
                if any(p.get("name", "").lower() == "idempotency-key" for p in operation.get("parameters", []))}
    assert declared == set(ROUTES)


async def test_another_token_of_the_subject_never_gets_the_stored_response(client: httpx.AsyncClient) -> None:
    leaks: list[str] = []
    for route, build in ROUTES.items():
        path, request = await build(client)
        key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
        first = await client.post(path, headers={**OWNER, **key}, **request)
        assert first.status_code in (200, 201, 202), f"{route}: {first.status_code} {first.text}"
        stolen = await client.post(path, headers={**MASKED, **key}, **request)
        if stolen.status_code != 422 or stolen.headers.get("idempotent-replayed"):
            leaks.append(f"{route}: {stolen.status_code} replayed={stolen.headers.get('idempotent-replayed')}")
            continue
        errors = stolen.json()["errors"]
        assert [e["code"] for e in errors] == ["idempotency_key_other_token"], errors
        assert first.text not in stolen.text
        # The owner's own retry still gets its answer back (tokens: the documented 409, never a second token).
        again = await client.post(path, headers={**OWNER, **key}, **request)
        if route == "/v1/tokens":
            assert again.status_code == 409, again.text
        else:
            assert (again.status_code, again.headers.get("idempotent-replayed")) == (first.status_code, "true")
            # (a destination's generated secrets are shown once: the replay has them empty)
            assert {**again.json(), "generated_secrets": None} == {**first.json(), "generated_secrets": None}
    assert leaks == []


async def test_the_masked_token_sees_no_personal_data_of_the_owners_upsert(client: httpx.AsyncClient) -> None:
    """The finding as reported: A upserts a person; B, without pii:read, replays A's key and body."""
    email = unique_email()
    body = {"email": email, "first_name": "Claire", "last_name": "Martin", "phone": "+33612345678"}
    key = {"Idempotency-Key": "checkout-42"}
    owner = await client.post("/v1/contacts/upsert", headers={**OWNER, **key}, json=body)
    assert owner.status_code == 201 and owner.json()["email"] == email
    masked = await client.post("/v1/contacts/upsert", headers={**MASKED, **key}, json=body)
    assert masked.status_code == 422, masked.text
    for value in (email, "Claire", "Martin", "+33612345678"):
        assert value not in masked.text
