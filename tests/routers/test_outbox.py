"""Every change a destination may care about writes its outbox row in the same transaction (docs/sync.md)."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.factories import ADMIN, unique_email


async def messages(sessions: async_sessionmaker[AsyncSession], contact_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with sessions() as session:
        rows = await session.execute(
            text("SELECT topic, payload FROM outbox_message WHERE contact_id = :c ORDER BY id"), {"c": contact_id})
        return [(r.topic, r.payload) for r in rows]


async def test_contact_writes_are_announced_on_every_path(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    created = (await client.post("/v1/contacts", json={"email": unique_email()}, headers=ADMIN)).json()
    fast = await client.post("/v1/contacts/upsert", json={"email": unique_email()}, headers=ADMIN)  # one statement
    assert fast.status_code == 201
    updated = await client.post("/v1/contacts/upsert", json={"email": created["email"], "first_name": "Léa"},
                                headers=ADMIN)
    assert updated.status_code == 200
    patched = await client.patch(f"/v1/contacts/{created['id']}", json={"last_name": "Roux"}, headers=ADMIN)
    tagged = await client.put(f"/v1/contacts/{created['id']}/tags/vip", headers=ADMIN)
    withdrawn = await client.post(f"/v1/contacts/{created['id']}/consents", headers=ADMIN, json={
        "purpose": "sms_marketing", "action": "withdrawn", "source": "sms_stop"})
    assert (patched.status_code, tagged.status_code, withdrawn.status_code) == (200, 200, 201), withdrawn.text

    assert await messages(sessions, fast.json()["id"]) == [("contact.created", {"contact_id": fast.json()["id"]})]
    assert await messages(sessions, created["id"]) == [
        ("contact.created", {"contact_id": created["id"]}),
        ("contact.updated", {"contact_id": created["id"], "fields": ["first_name"]}),
        ("contact.updated", {"contact_id": created["id"], "fields": ["last_name"]}),
        ("contact.updated", {"contact_id": created["id"], "fields": ["tags"]}),
        ("consent.withdrawn", {"contact_id": created["id"], "purpose": "sms_marketing"}),
    ]
    # Payloads carry ids and field names, never the values (personal data stays in Carnet).
    assert created["email"] not in str(await messages(sessions, created["id"]))
