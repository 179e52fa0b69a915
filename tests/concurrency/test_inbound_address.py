"""Vendor webhooks racing other writes: an address change racing the shop's; two batches of events at once.

A Mailchimp `upemail` says "a@ is now c@". The contact is found by a@ before it is locked: if the shop changed the
contact's address to b@ meanwhile (PATCH, answered 200), the vendor's event is about an address the contact no
longer has, and must not overwrite b@. Serially: the PATCH first, the event finds no one with a@ (nothing
changes); the event first, the PATCH then sets b@. Either way the contact ends with b@.

Deterministic: the PATCH is held at its outbox row (a helper connection locks the table) with the contact locked
and b@ written, while the webhook looks a@ up (the committed row) and queues for the contact's lock.
"""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from tests.concurrency.held import race_past_held_table
from tests.factories import ADMIN, PROOF, make_contact
from tests.sync.test_inbound import FIRED, REMOTE, post_mailchimp, setup

pytestmark = pytest.mark.committing


async def test_a_vendor_address_change_for_an_address_the_shop_just_replaced_changes_nothing(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    destination, secret, person, _ = await setup(http)
    shop, vendor = f"shop-{uuid.uuid4().hex[:8]}@example.com", f"vendor-{uuid.uuid4().hex[:8]}@example.com"
    form = {"type": "upemail", "fired_at": FIRED, "data[list_id]": REMOTE, "data[new_id]": "51da8c3259",
            "data[new_email]": vendor, "data[old_email]": person["email"]}
    patched, hooked = await race_past_held_table(
        helper, "outbox_message",
        http.patch(f"/v1/contacts/{person['id']}", json={"email": shop}, headers=ADMIN),
        post_mailchimp(http, destination, secret, form))
    assert patched.status_code == 200, patched.text
    assert hooked.status_code == 200, hooked.text
    email = await helper.fetchval("SELECT email FROM contact WHERE id = $1", uuid.UUID(person["id"]))
    assert email == shop, f"the shop's {shop} (200) was overwritten by {email}, from an event about the old address"


async def test_two_vendor_batches_naming_the_same_people_in_another_order_both_go_through(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    """Brevo posts events in batches; each event locks its contact until the batch commits. Two batches naming
    the same two people in another order must queue, not deadlock (a 500, and the vendor sends them again)."""
    http = committing_client
    destination, secret, first, lists = await setup(http, "brevo")
    second = await make_contact(http)
    subscribed = await http.put(f"/v1/lists/{lists['mapped']['id']}/members/{second['id']}",
                                json={"consent": {"proof": PROOF}}, headers=ADMIN)
    assert subscribed.status_code == 201, subscribed.text
    url, auth = f"/v1/inbound/brevo/{destination['id']}", {"Authorization": f"Bearer {secret}"}

    def bounces(*people: dict[str, str]) -> list[dict[str, object]]:
        return [{"event": "hard_bounce", "email": p["email"], "id": n, "date": "2026-11-21 08:00:00",
                 "reason": "mailbox does not exist"} for n, p in enumerate(people)]

    answers = await race_past_held_table(  # each batch stops after its first event
        helper, "outbox_message",
        http.post(url, json=bounces(first, second), headers=auth),
        http.post(url, json=bounces(second, first), headers=auth))
    assert [r.status_code for r in answers] == [200, 200], [r.text[:300] for r in answers]
    statuses = {r["email_status"] for r in await helper.fetch(
        "SELECT email_status FROM contact WHERE id = ANY($1::uuid[])", [first["id"], second["id"]])}
    assert statuses == {"bounced"}
