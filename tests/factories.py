"""Small factories that go through the API, so every fixture row passes the same rules as real data."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.auth import bearer

ADMIN = bearer()


def unique_email() -> str:
    return f"{uuid.uuid4().hex[:12]}@example.com"


async def make_contact(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"email": unique_email(), **fields}
    response = await client.post("/v1/contacts", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def make_attribute(client: httpx.AsyncClient, name: str, type_: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/attributes", json={"name": name, "type": type_, **extra}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


PROOF = {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (test)", "form_url": "https://shop.example/newsletter",
         "wording": "Yes, send me the newsletter", "policy_version": "2026-01"}


async def make_list(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"name": f"list-{uuid.uuid4().hex[:8]}", **fields}
    response = await client.post("/v1/lists", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def grant_marketing(client: httpx.AsyncClient, contact_id: str, **fields: Any) -> dict[str, Any]:
    """Record an email_marketing grant on the contact's ledger."""
    body = {"purpose": "email_marketing", "action": "granted", "source": "newsletter_form", "proof": PROOF, **fields}
    response = await client.post(f"/v1/contacts/{contact_id}/consents", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]
