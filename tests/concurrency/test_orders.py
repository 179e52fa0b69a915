"""Stats equal the orders, and concurrent orders for one customer never deadlock (issue 21, items 3 and 6).

- Status changes racing on one contact's orders (a back office cancelling and re-opening them): afterwards every
  contact's stats and lifecycle stage are those the orders table gives (checked in SQL, every round).
- 50 concurrent `PUT /v1/orders/{new id}` for one customer, by id and by email (a marketplace, a backfill), with
  behaviour events for the same customer in between: every one 201, 0 deadlocks, 0 5xx, and the stats count 50.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tests.concurrency.conftest import Race, RoundStats, gather
from tests.factories import unique_email

CONTACTS = 6
ORDERS_EACH = 5
STATUS_ROUNDS = 8
BURST = 50
BURST_ROUNDS = 3

# Every contact whose stored stats or stage differ from what its counted orders give (one currency, every
# order placed within the loyalty window, LOYAL_MIN_ORDERS = 3).
DRIFTED = """
WITH counted AS (
    SELECT contact_id, count(*) AS n, sum(total_amount) AS total, min(placed_at) AS first, max(placed_at) AS last
    FROM "order" WHERE status NOT IN ('cancelled', 'refunded') GROUP BY contact_id
), latest AS (
    SELECT DISTINCT ON (contact_id) contact_id, total_amount FROM "order"
    WHERE status NOT IN ('cancelled', 'refunded') ORDER BY contact_id, placed_at DESC, id DESC
)
SELECT c.id FROM contact c LEFT JOIN counted o ON o.contact_id = c.id LEFT JOIN latest l ON l.contact_id = c.id
WHERE c.orders_count <> coalesce(o.n, 0) OR c.total_spent <> coalesce(o.total, 0)
   OR c.first_order_at IS DISTINCT FROM o.first OR c.last_order_at IS DISTINCT FROM o.last
   OR c.last_order_amount IS DISTINCT FROM l.total_amount
   OR c.lifecycle_stage <> CASE WHEN o.n IS NULL THEN 'prospect' WHEN o.n >= 3 THEN 'loyal_customer'
                                ELSE 'new_customer' END
"""


def order_body(contact: dict[str, Any], placed_at: datetime, amount: str, status: str = "paid") -> dict[str, Any]:
    return {"contact": contact, "placed_at": placed_at.isoformat(), "status": status, "currency": "EUR",
            "total_amount": amount, "items": [{"sku": "TS-42", "quantity": 1, "unit_price": amount}]}


async def test_stats_equal_the_orders_while_their_statuses_race(race: Race) -> None:
    rng = random.Random(21)  # noqa: S311 (test data)
    now = datetime.now(UTC).replace(microsecond=0)
    orders: dict[str, dict[str, Any]] = {}
    for c in range(CONTACTS):
        contact = await race.ok("POST", "/v1/contacts", json={"email": unique_email()})
        for k in range(ORDERS_EACH):
            body = order_body({"id": contact["id"]}, now - timedelta(hours=k + 1), f"{10 + 7 * k + c}.50")
            orders[f"race-{uuid.uuid4().hex[:10]}"] = body
    for external_id, body in orders.items():
        await race.ok("PUT", f"/v1/orders/{external_id}", json=body)
    stats = RoundStats("stats drift")
    for _ in range(STATUS_ROUNDS):
        # Every order of every contact gets a status at once: the latest ones flip between counted and not.
        changes = {external_id: {**body, "status": rng.choice(("paid", "cancelled", "shipped", "refunded"))}
                   for external_id, body in orders.items()}
        responses = await gather(*(race.send("PUT", f"/v1/orders/{external_id}", json=body)
                                   for external_id, body in changes.items()))
        orders = changes
        drifted = await race.db.fetch(DRIFTED)
        stats.record(not drifted and all(r.status_code == 200 for r in responses))
    print(stats, dict(race.statuses))
    assert stats.broken == 0, stats
    race.assert_no_server_error()


async def test_fifty_concurrent_new_orders_for_one_customer_all_go_through(race: Race) -> None:
    stats = RoundStats("concurrent new orders")
    now = datetime.now(UTC).replace(microsecond=0)
    for _ in range(BURST_ROUNDS):
        email = unique_email()
        contact = await race.ok("POST", "/v1/contacts", json={"email": email})
        refs = [{"id": contact["id"]}, {"email": email}]
        calls = [race.send("PUT", f"/v1/orders/burst-{uuid.uuid4().hex[:12]}",
                           json=order_body(refs[i % 2], now - timedelta(minutes=i), f"{i + 1}.00"))
                 for i in range(BURST)]
        calls += [race.send("POST", "/v1/events", json={"contact": refs[i % 2], "type": "page_view",
                                                         "occurred_at": now.isoformat()})
                  for i in range(BURST // 5)]
        responses = await gather(*calls)
        statuses = sorted(r.status_code for r in responses)
        row = await race.db.fetchrow("SELECT orders_count, total_spent FROM contact WHERE id = $1",
                                     uuid.UUID(contact["id"]))
        ok = statuses == [201] * len(calls) and row["orders_count"] == BURST
        stats.record(ok)
        if ok:
            assert row["total_spent"] == sum(Decimal(i + 1) for i in range(BURST))
    print(stats, dict(race.statuses), f"deadlocks logged: {race.deadlocks()}")
    assert stats.broken == 0, (stats, dict(race.statuses), race.crashes()[:2])
    assert await race.db.fetch(DRIFTED) == []
    race.assert_no_server_error()
