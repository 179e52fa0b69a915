"""One event_id is stored once across the monthly partitions of `event` (issue 18), however it races.

Clients post the same event_id at once, each with another `occurred_at` (this month, months back, a month with
no partition that lands in the default partition, far in the future), alone and inside batches: one event row,
one key, one 201 (or one "created"), every other answer naming the stored event. Each client names its own
contact, so that the contacts' row locks do not queue the clients: they meet on the key alone.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.concurrency.conftest import Race, gather
from tests.factories import unique_email

CLIENTS = 24


def _moments() -> list[str]:
    now = datetime.now(UTC)
    # months apart, and in the default partition (1999: before any month made); nothing more than a day ahead,
    # which the API refuses (docs/api.md)
    spread = [now, now - timedelta(days=40), now - timedelta(days=400), now + timedelta(hours=20),
              datetime(1999, 5, 17, 8, 0, tzinfo=UTC), now - timedelta(days=95)]
    return [spread[i % len(spread)].isoformat() for i in range(CLIENTS)]


def _event(contact_id: str, event_id: str, occurred_at: str, **extra: Any) -> dict[str, Any]:
    return {"contact": {"id": contact_id}, "type": "page_view", "occurred_at": occurred_at, "event_id": event_id,
            "properties": {"path": "/", **extra}}


async def _contact(race: Race) -> str:
    return str((await race.ok("POST", "/v1/contacts", json={"email": unique_email()}))["id"])


async def _stored(race: Race, event_id: str) -> list[Any]:
    rows = await race.db.fetch("SELECT id, tableoid::regclass::text AS part FROM event WHERE event_id = $1", event_id)
    keys = await race.db.fetch("SELECT id FROM event_key WHERE event_id = $1", event_id)
    assert len(rows) == 1 and len(keys) == 1 and keys[0]["id"] == rows[0]["id"], (rows, keys)
    return rows


async def test_one_event_id_posted_at_once_with_different_months_is_stored_once(race: Race) -> None:
    contacts = [await _contact(race) for _ in range(CLIENTS)]
    event_id = f"evt-{uuid.uuid4()}"
    responses = await gather(*(race.send("POST", "/v1/events", json=_event(contact, event_id, at, n=i))
                               for i, (contact, at) in enumerate(zip(contacts, _moments(), strict=True))))
    assert sorted(r.status_code for r in responses) == [200] * (CLIENTS - 1) + [201], [r.text for r in responses]
    (row,) = await _stored(race, event_id)
    assert {r.json()["id"] for r in responses} == {row["id"]}
    winner = next(r.json() for r in responses if r.status_code == 201)
    assert all(r.json() == winner for r in responses)  # the replays answer the stored event, its month included
    race.assert_no_server_error()


async def test_batches_racing_on_shared_event_ids_store_each_once(race: Race) -> None:
    """Each batch carries the same 20 shared event_ids (its own months for them) and 5 of its own."""
    contacts = [await _contact(race) for _ in range(12)]
    shared = [f"evt-{uuid.uuid4()}" for _ in range(20)]
    moments = _moments()
    batches = []
    for b, contact in enumerate(contacts):
        common = [_event(contact, key, moments[(b + k) % CLIENTS]) for k, key in enumerate(shared)]
        own = [_event(contact, f"own-{b}-{k}-{uuid.uuid4()}", moments[b]) for k in range(5)]
        batches.append((common if b % 2 else common[::-1]) + own)  # two orders: keys are still taken in one
    responses = await gather(*(race.send("POST", "/v1/events/batch", json={"items": items}) for items in batches))
    assert [r.status_code for r in responses] == [200] * len(batches), [r.text[:300] for r in responses]
    created: dict[str, int] = {}
    for response, items in zip(responses, batches, strict=True):
        body = response.json()
        assert body["errors"] == 0, body
        for item, result in zip(items, body["results"], strict=True):
            if result["status"] == "created":
                assert item["event_id"] not in created
                created[item["event_id"]] = result["id"]
    assert set(shared) <= set(created)  # each shared key was created by exactly one batch ...
    for key in shared:
        (row,) = await _stored(race, key)
        assert row["id"] == created[key]
    for response, items in zip(responses, batches, strict=True):  # ... and every other batch names that event
        for item, result in zip(items, response.json()["results"], strict=True):
            assert result["id"] == created[item["event_id"]]
    assert await race.db.fetchval("SELECT count(*) FROM event WHERE event_id = ANY($1)", list(created)) \
        == len(shared) + 5 * len(batches)
    race.assert_no_server_error()
