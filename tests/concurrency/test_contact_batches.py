"""Two batches naming the same contacts in another order: both go through, neither deadlocks.

docs/operations.md ("Why no deadlock"): writers take their contact locks in one order, so concurrent writers
queue instead of deadlocking. A batch upsert (`POST /v1/contacts/batch`) locked each item's contact as it came to
it, and kept every lock until it committed: batches [A, B] and [B, A] each held one and waited for the other, and
PostgreSQL ended one of them (40P01: a 500). Deterministic: a helper connection holds the outbox table, so each
batch stops after writing its first item, holding that contact; then both go on.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from tests.concurrency.held import race_past_held_table
from tests.factories import ADMIN, make_contact

pytestmark = pytest.mark.committing


async def test_two_batches_updating_the_same_contacts_in_another_order_both_go_through(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    first, second = await make_contact(http), await make_contact(http)
    forward = [{"email": first["email"], "company": "Forward"}, {"email": second["email"], "company": "Forward"}]
    backward = [{"email": second["email"], "company": "Backward"}, {"email": first["email"], "company": "Backward"}]
    answers = await race_past_held_table(  # each batch stops after its first item
        helper, "outbox_message", http.post("/v1/contacts/batch", json={"items": forward}, headers=ADMIN),
        http.post("/v1/contacts/batch", json={"items": backward}, headers=ADMIN))
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert all(r.json()["updated"] == 2 for r in answers), [r.json() for r in answers]
    companies = {r["company"] for r in await helper.fetch(
        "SELECT company FROM contact WHERE id = ANY($1::uuid[])", [first["id"], second["id"]])}
    assert len(companies) == 1, companies  # one batch went wholly after the other


async def test_two_event_batches_naming_the_same_people_by_email_in_another_order_both_go_through(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    """`POST /v1/events/batch`: an item naming its contact by email is recorded through the upsert, one by one,
    each locking its contact until the batch commits; the same two batches in another order."""
    http = committing_client
    first, second = await make_contact(http), await make_contact(http)
    now = datetime.now(UTC).isoformat()

    def events(*people: dict[str, str]) -> dict[str, list[dict[str, object]]]:
        return {"items": [{"contact": {"email": p["email"]}, "type": "page_view", "occurred_at": now,
                           "event_id": f"ev-{uuid.uuid4().hex}"} for p in people]}

    answers = await race_past_held_table(  # each batch stops at its first event
        helper, "event_key", http.post("/v1/events/batch", json=events(first, second), headers=ADMIN),
        http.post("/v1/events/batch", json=events(second, first), headers=ADMIN))
    assert [r.status_code for r in answers] == [200, 200], [r.text[:300] for r in answers]
    stored = await helper.fetchval("SELECT count(*) FROM event WHERE contact_id = ANY($1::uuid[])",
                                   [first["id"], second["id"]])
    assert stored == 4


async def test_two_batches_creating_the_same_contacts_in_another_order_both_go_through(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    """A new contact's row is 'locked' by its insert (the unique index makes another insert of the same email wait
    for that transaction), and a batch inserts its new contacts in item order: [x@, y@] and [y@, x@] at once each
    wait for the other's insert, and PostgreSQL ends one as a deadlock's victim (40P01, was a 500). The victim's
    batch rolls back to its savepoint, which frees what it inserted, and runs again (db.retry_deadlocks): both
    answer 200, one creating both contacts and the other updating them."""
    http = committing_client
    x, y = f"x-{uuid.uuid4().hex[:8]}@example.com", f"y-{uuid.uuid4().hex[:8]}@example.com"
    answers = await race_past_held_table(  # each batch stops after its first item
        helper, "outbox_message", http.post("/v1/contacts/batch", json={"items": [{"email": x}, {"email": y}]},
                                          headers=ADMIN),
        http.post("/v1/contacts/batch", json={"items": [{"email": y}, {"email": x}]},
                                            headers=ADMIN))
    assert [r.status_code for r in answers] == [200, 200], [r.text[:300] for r in answers]
    # each address created once, by one batch, and updated by the other: no item failed, none was lost
    assert sorted((a.json()["created"], a.json()["updated"], a.json()["errors"]) for a in answers) == [
        (0, 2, 0), (2, 0, 0)], [a.json() for a in answers]
    ids = [{r["id"] for r in a.json()["results"]} for a in answers]
    assert ids[0] == ids[1] and len(ids[0]) == 2


async def test_two_event_batches_creating_the_same_people_by_email_in_another_order_both_go_through(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    """`POST /v1/events/batch` items naming new people by email create them one by one through the upsert: two such
    batches in another order each waited for the other's insert (40P01, a 500) until the batch took the buckets of
    its new keys first (locks.lock_new_keys), as a contact batch does."""
    http = committing_client
    x, y = f"x-{uuid.uuid4().hex[:8]}@example.com", f"y-{uuid.uuid4().hex[:8]}@example.com"
    now = datetime.now(UTC).isoformat()

    def events(*emails: str) -> dict[str, list[dict[str, object]]]:
        return {"items": [{"contact": {"email": e}, "type": "page_view", "occurred_at": now,
                           "event_id": f"ev-{uuid.uuid4().hex}"} for e in emails]}

    answers = await race_past_held_table(  # each batch stops at its first event
        helper, "event_key", http.post("/v1/events/batch", json=events(x, y), headers=ADMIN),
        http.post("/v1/events/batch", json=events(y, x), headers=ADMIN))
    assert [r.status_code for r in answers] == [200, 200], [r.text[:300] for r in answers]
    people = await helper.fetch("SELECT id FROM contact WHERE email = ANY($1::text[])", [x, y])
    stored = await helper.fetchval("SELECT count(*) FROM event WHERE contact_id = ANY($1::uuid[])",
                                   [p["id"] for p in people])
    assert (len(people), stored) == (2, 4)
