"""A vendor's address change racing the shop's (issue 21 rules: decide under the lock what the lock protects).

A Mailchimp `upemail` says "a@ is now c@". The contact is found by a@ before it is locked: if the shop changed the
contact's address to b@ meanwhile (PATCH, answered 200), the vendor's event is about an address the contact no
longer has, and must not overwrite b@. Serially: the PATCH first, the event finds no one with a@ (nothing
changes); the event first, the PATCH then sets b@. Either way the contact ends with b@.

Deterministic: the PATCH is held at its outbox row (a helper connection locks the table) with the contact locked
and b@ written, while the webhook looks a@ up (the committed row) and queues for the contact's lock.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from app.db import plain_dsn
from tests.concurrency.held import until_waiting
from tests.factories import ADMIN
from tests.sync.test_inbound import FIRED, REMOTE, post_mailchimp, setup

pytestmark = pytest.mark.committing


async def test_a_vendor_address_change_for_an_address_the_shop_just_replaced_changes_nothing(
    committing_client: httpx.AsyncClient, database_url: str,
) -> None:
    http = committing_client
    destination, secret, person, _ = await setup(http)
    shop, vendor = f"shop-{uuid.uuid4().hex[:8]}@example.com", f"vendor-{uuid.uuid4().hex[:8]}@example.com"
    form = {"type": "upemail", "fired_at": FIRED, "data[list_id]": REMOTE, "data[new_id]": "51da8c3259",
            "data[new_email]": vendor, "data[old_email]": person["email"]}
    helper = await asyncpg.connect(plain_dsn(database_url))
    try:
        holding = helper.transaction()
        await holding.start()
        await helper.execute("LOCK TABLE outbox_message IN EXCLUSIVE MODE")
        patch = asyncio.ensure_future(http.patch(f"/v1/contacts/{person['id']}", json={"email": shop},
                                                 headers=ADMIN))
        await until_waiting(helper, 1)  # b@ written, the contact locked, not committed
        webhook = asyncio.ensure_future(post_mailchimp(http, destination, secret, form))
        await until_waiting(helper, 2, or_done=webhook)  # found by a@, waiting for the contact
        await holding.rollback()
        patched, hooked = await patch, await webhook
        assert patched.status_code == 200, patched.text
        assert hooked.status_code == 200, hooked.text
        email = await helper.fetchval("SELECT email FROM contact WHERE id = $1", uuid.UUID(person["id"]))
        assert email == shop, f"the shop's {shop} (200) was overwritten by {email}, from an event about the old address"
    finally:
        await helper.close()
