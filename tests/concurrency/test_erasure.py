"""An erased person never comes back (issue 21, item 5).

Each round erases a contact while other clients give its address to a contact by every route that can: a create,
a PATCH of another contact, upserts (the autocommit fast path and the transactional one), a batch, an order and a
behaviour event naming the email (a checkout creates the contact). Whatever the interleaving, a write either
went through before the erasure (then the erasure removed it with the person) or was refused (409); afterwards
no contact holds the address (checked in SQL), and nothing answered 5xx.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx

from tests.concurrency.conftest import Race, RoundStats
from tests.factories import unique_email

ROUNDS = 12
COPIES = 3           # each write sent this many times, at random moments of the erasure
ANSWERS = {200, 201, 204, 409}


async def later(race: Race, delay: float, method: str, url: str, **kwargs: Any) -> httpx.Response:
    await asyncio.sleep(delay)
    return await race.send(method, url, **kwargs)


async def test_an_address_given_while_its_person_is_erased_does_not_come_back(race: Race) -> None:
    rng = random.Random(5)  # noqa: S311 (test data)
    stats = RoundStats("erased person back")
    answers: Counter[int] = Counter()
    now = datetime.now(UTC).isoformat()
    for _ in range(ROUNDS):
        email = unique_email()
        person = await race.ok("POST", "/v1/contacts", json={"email": email, "first_name": "Gwenn"})
        other = await race.ok("POST", "/v1/contacts", json={"email": unique_email()})
        writes: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/v1/contacts", {"email": email}),
            ("POST", "/v1/contacts", {"email": email, "tags": ["signup"]}),
            ("PATCH", f"/v1/contacts/{other['id']}", {"email": email}),
            ("POST", "/v1/contacts/upsert", {"email": email, "first_name": "Gwenn"}),   # the fast path
            ("POST", "/v1/contacts/upsert", {"email": email, "tags": ["vip"]}),         # the transactional one
            ("POST", "/v1/contacts/upsert", {"external_id": f"shop-{uuid.uuid4().hex[:8]}", "email": email}),
            ("POST", "/v1/contacts/batch", {"items": [{"email": email, "company": "Acme"}]}),
            ("PUT", f"/v1/orders/gone-{uuid.uuid4().hex[:10]}", {
                "contact": {"email": email}, "placed_at": now, "status": "paid", "currency": "EUR",
                "total_amount": "9.90", "items": [{"sku": "A1", "quantity": 1, "unit_price": "9.90"}]}),
            ("POST", "/v1/events", {"contact": {"email": email}, "type": "page_view", "occurred_at": now}),
        ]
        responses = await asyncio.gather(
            race.send("DELETE", f"/v1/contacts/{person['id']}"),
            *(later(race, rng.uniform(0, 0.04), method, url, json=body)
              for method, url, body in writes for _ in range(COPIES)),
        )
        answers.update(r.status_code for r in responses)
        left = await race.db.fetchval("SELECT count(*) FROM contact WHERE email = $1", email)
        stats.record(responses[0].status_code == 204 and left == 0
                     and {r.status_code for r in responses} <= ANSWERS)
    print(stats, dict(answers))
    assert stats.broken == 0, (stats, dict(answers))
    race.assert_no_server_error()
