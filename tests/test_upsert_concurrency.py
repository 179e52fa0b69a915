"""Concurrent upserts through the autocommit statements (contacts.fast_upsert), in real, separate transactions.

An update is computed from the version read, and written only if the contact is still at that version; a request
that finds it moved takes the transactional path (row locks). Either way no change may be lost: 20 upserts of one
contact, each with its own company name, make 20 versions, 20 history rows and 20 outbox messages.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import ADMIN, unique_email

pytestmark = pytest.mark.committing

UPSERT = "/v1/contacts/upsert"
WRITERS = 20


async def test_concurrent_upserts_of_one_contact_lose_no_change(committing_client: httpx.AsyncClient,
                                                                engine: AsyncEngine) -> None:
    external_id = f"shop-{uuid.uuid4().hex[:8]}"
    created = await committing_client.post(UPSERT, json={"external_id": external_id, "email": unique_email()},
                                           headers=ADMIN)
    assert created.status_code == 201
    responses = await asyncio.gather(*(
        committing_client.post(UPSERT, json={"external_id": external_id, "company": f"Acme {i}"}, headers=ADMIN)
        for i in range(WRITERS)
    ))
    assert [r.status_code for r in responses] == [200] * WRITERS
    assert sorted(r.json()["version"] for r in responses) == list(range(2, WRITERS + 2))
    contact_id = created.json()["id"]
    async with engine.connect() as connection:
        version = await connection.scalar(text("SELECT version FROM contact WHERE id = :id"), {"id": contact_id})
        changes = await connection.scalar(
            text("SELECT count(*) FROM contact_history WHERE contact_id = :id AND field = 'company'"),
            {"id": contact_id})
        news = await connection.scalar(
            text("SELECT count(*) FROM outbox_message WHERE contact_id = :id AND topic = 'contact.updated'"),
            {"id": contact_id})
    assert (version, changes, news) == (WRITERS + 1, WRITERS, WRITERS)
