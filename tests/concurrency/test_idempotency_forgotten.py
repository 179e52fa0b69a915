"""A request repeated with its Idempotency-Key while the stored response is deleted: the key is free again.

The stored response of a create is deleted when the person it names is erased (services/gdpr.py) and when it
expires (`IdempotencyExpiry`). A repeat finds the key taken (its insert conflicts), then locks the row to replay
it: deleted in between, the row was not there any more and the repeat answered 500. It now claims the key anew,
as a request arriving just after the deletion would: here the create runs again and is refused, the address
being an erased person's (409).

Deterministic: a helper connection holds the stored row's lock while the erasure (which deletes it) and then
the repeat queue for it.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from tests.concurrency.held import until_waiting
from tests.factories import ADMIN, unique_email

pytestmark = pytest.mark.committing


async def test_a_create_repeated_while_its_person_is_erased_is_refused_not_a_500(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    key = f"signup-{uuid.uuid4()}"
    headers = {**ADMIN, "Idempotency-Key": key}
    body = {"email": unique_email(), "first_name": "Gwenn"}
    created = await http.post("/v1/contacts", json=body, headers=headers)
    assert created.status_code == 201, created.text
    holding = helper.transaction()
    await holding.start()
    assert await helper.fetchval("SELECT key FROM idempotency_record WHERE key = $1 FOR UPDATE", key) == key
    erase = asyncio.ensure_future(http.delete(f"/v1/contacts/{created.json()['id']}", headers=ADMIN))
    await until_waiting(helper, 1)  # the erasure waits to delete the stored response
    repeat = asyncio.ensure_future(http.post("/v1/contacts", json=body, headers=headers))
    await until_waiting(helper, 2, or_done=repeat)  # the repeat found the key taken, waits to replay it
    await holding.rollback()
    erased, repeated = await erase, await repeat
    assert erased.status_code == 204, erased.text
    assert repeated.status_code == 409, repeated.text
    assert repeated.json()["type"].endswith("/suppressed-contact")
    assert await helper.fetchval("SELECT count(*) FROM contact WHERE email = $1", body["email"]) == 0
