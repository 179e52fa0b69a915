"""Identical creates and same-key upserts make one contact (issue 8; held under the review of issue 21).

50 clients at once, each with its own token and connection:
- creates with one Idempotency-Key: one contact, 50 identical answers;
- creates without a key: one contact, 49 conflicts (409) naming it;
- upserts with the same external_id and email (the autocommit fast path, falling back to the transactional one):
  one contact; and 20 upserts of one contact each changing it: 20 versions, 20 history rows, 20 outbox messages.
Each is also checked in SQL: one row, one `contact.created` message.
"""

from __future__ import annotations

import uuid

from app.security import Role
from tests.auth import bearer
from tests.concurrency.conftest import ADMIN, Race, gather
from tests.factories import unique_email

CLIENTS = 50
WRITERS = 20
UPSERT = "/v1/contacts/upsert"


def client_tokens() -> list[dict[str, str]]:
    return [bearer(Role.EDITOR, subject=f"client-{i}@shop.example") for i in range(CLIENTS)]


async def one_contact(race: Race, email: str) -> str:
    """The one contact holding `email`, announced once."""
    rows = await race.db.fetch("SELECT id FROM contact WHERE email = $1", email)
    assert len(rows) == 1, rows
    created = await race.db.fetchval(
        "SELECT count(*) FROM outbox_message WHERE contact_id = $1 AND topic = 'contact.created'", rows[0]["id"])
    assert created == 1
    return str(rows[0]["id"])


async def test_fifty_creates_with_one_idempotency_key_make_one_contact_and_one_answer(race: Race) -> None:
    email = unique_email()
    headers = {**ADMIN, "Idempotency-Key": f"signup-{uuid.uuid4()}"}
    body = {"email": email, "first_name": "Claire", "tags": ["vip"]}
    responses = await gather(*(race.send("POST", "/v1/contacts", json=body, headers=headers) for _ in range(CLIENTS)))
    assert [r.status_code for r in responses] == [201] * CLIENTS, {r.status_code: r.text for r in responses}
    first = responses[0]
    for response in responses:
        assert response.json() == first.json()
        assert response.headers["etag"] == first.headers["etag"]
        assert response.headers["location"] == first.headers["location"] == f"/v1/contacts/{first.json()['id']}"
    assert await one_contact(race, email) == first.json()["id"]
    race.assert_no_server_error()


async def test_fifty_creates_without_a_key_make_one_contact_and_49_conflicts(race: Race) -> None:
    email = unique_email()
    responses = await gather(*(race.send("POST", "/v1/contacts", json={"email": email}, headers=headers)
                               for headers in client_tokens()))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * (CLIENTS - 1), statuses
    winner = next(r for r in responses if r.status_code == 201).json()["id"]
    conflicts = [r for r in responses if r.status_code == 409]
    assert {r.headers["content-type"] for r in conflicts} == {"application/problem+json"}
    assert {r.json()["type"].rsplit("/", 1)[-1] for r in conflicts} == {"duplicate-contact"}
    assert {r.json()["existing_id"] for r in conflicts} == {winner}
    assert await one_contact(race, email) == winner
    race.assert_no_server_error()


async def test_fifty_identical_upserts_make_one_contact(race: Race) -> None:
    email = unique_email()
    body = {"external_id": f"shop-{uuid.uuid4().hex[:8]}", "email": email, "first_name": "Claire"}
    responses = await gather(*(race.send("POST", UPSERT, json=body, headers=headers) for headers in client_tokens()))
    assert sorted(r.status_code for r in responses) == [200] * (CLIENTS - 1) + [201]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert await one_contact(race, email) == ids.pop()
    race.assert_no_server_error()


async def test_concurrent_upserts_of_one_contact_lose_no_change(race: Race) -> None:
    external_id = f"shop-{uuid.uuid4().hex[:8]}"
    created = await race.ok("POST", UPSERT, json={"external_id": external_id, "email": unique_email()})
    responses = await gather(*(race.send("POST", UPSERT, json={"external_id": external_id, "company": f"Acme {i}"})
                               for i in range(WRITERS)))
    assert [r.status_code for r in responses] == [200] * WRITERS
    assert sorted(r.json()["version"] for r in responses) == list(range(2, WRITERS + 2))
    row = await race.db.fetchrow(
        "SELECT version,"
        " (SELECT count(*) FROM contact_history WHERE contact_id = c.id AND field = 'company') AS changes,"
        " (SELECT count(*) FROM outbox_message WHERE contact_id = c.id AND topic = 'contact.updated') AS news"
        " FROM contact c WHERE id = $1", uuid.UUID(created["id"]))
    assert tuple(row) == (WRITERS + 1, WRITERS, WRITERS)
    race.assert_no_server_error()
