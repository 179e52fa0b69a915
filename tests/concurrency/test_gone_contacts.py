"""Writes to a contact merged or erased a moment ago: the documented 4xx, or the survivor (issue 21, item 7).

Each round merges or erases a contact while other clients write to it by its id: orders and events (one by one
and in a batch), tags, a PATCH, a consent, list memberships (one, and in a batch). Whatever the interleaving:

- no 5xx (before the fix: foreign-key violations, 500);
- a write that came first went through (2xx), and the merge or erasure then took it along;
- one that came after an erasure is refused as for any unknown contact: 404 on a contact's own URL, 422
  `unknown_contact` for an order or event naming it;
- after a merge, orders and events naming the merged contact follow it to the survivor (as emailed links do:
  the merge moves the person's orders and events there), and every one the API accepted is stored, on the survivor.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx

from tests.concurrency.conftest import Race, RoundStats
from tests.factories import unique_email

ROUNDS = 10
AFTER_ERASURE = {200, 201, 204, 404, 422}
AFTER_MERGE = {200, 201, 204, 404}


def order(contact: dict[str, str], now: str) -> dict[str, Any]:
    return {"contact": contact, "placed_at": now, "status": "paid", "currency": "EUR", "total_amount": "5.00",
            "items": [{"sku": "A1", "quantity": 1, "unit_price": "5.00"}]}


async def test_writes_racing_a_merge_or_an_erasure_get_a_4xx_or_the_survivor(race: Race) -> None:
    news = await race.ok("POST", "/v1/lists", json={"name": "news"})
    stats = RoundStats("write to a gone contact")
    answers: Counter[int] = Counter()
    for round_no in range(ROUNDS):
        merging = round_no % 2 == 0
        now = datetime.now(UTC).isoformat()
        gone = await race.ok("POST", "/v1/contacts", json={"email": unique_email(), "external_id": f"g-{uuid.uuid4()}"})
        survivor = await race.ok("POST", "/v1/contacts", json={"email": unique_email()})
        await race.ok("PUT", f"/v1/lists/{news['id']}/members/{gone['id']}",
                      json={"consent": {"proof": {"wording": "yes"}}})
        url = f"/v1/contacts/{gone['id']}"
        by_id = {"id": gone["id"]}
        orders = [f"o-{uuid.uuid4().hex[:12]}" for _ in range(6)]
        writes = [
            *(race.send("PUT", f"/v1/orders/{external_id}", json=order(by_id, now)) for external_id in orders),
            *(race.send("POST", "/v1/events", json={"contact": by_id, "type": "page_view", "occurred_at": now})
              for _ in range(4)),
            race.send("POST", "/v1/events/batch",
                      json={"items": [{"contact": by_id, "type": "cart_abandoned", "occurred_at": now}] * 3}),
            race.send("PUT", f"{url}/tags/vip"),
            race.send("DELETE", f"{url}/tags/vip"),
            race.send("PATCH", url, json={"job_title": "Buyer"}),
            race.send("POST", f"{url}/consents", json={"purpose": "profiling", "action": "withdrawn"}),
            race.send("DELETE", f"/v1/lists/{news['id']}/members/{gone['id']}"),
            race.send("POST", f"/v1/lists/{news['id']}/members/batch", json={"add": [gone["id"]]}),
        ]
        end = (race.send("POST", f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": gone["id"]})
               if merging else race.send("DELETE", url))
        responses: list[httpx.Response] = await asyncio.gather(end, *writes)
        answers.update(r.status_code for r in responses)
        allowed = AFTER_MERGE if merging else AFTER_ERASURE
        ok = responses[0].status_code in (200, 204) and {r.status_code for r in responses} <= allowed
        if not merging:
            refused = [r for r in responses[1:] if r.status_code == 422]
            ok = ok and all(e["code"] == "unknown_contact" for r in refused for e in r.json()["errors"])
        else:  # every order the API took is stored on the survivor
            accepted = sum(r.status_code in (200, 201) for r in responses[1:1 + len(orders)])
            stored = await race.db.fetchval('SELECT count(*) FROM "order" WHERE external_id = ANY($1) '
                                            "AND contact_id = $2::text::uuid", orders, survivor["id"])
            ok = ok and accepted == stored == len(orders)
        stats.record(ok)
    print(stats, dict(answers))
    assert stats.broken == 0, (stats, dict(answers), race.crashes()[:2])
    race.assert_no_server_error()
