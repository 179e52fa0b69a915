"""Orders, events, stats and lifecycle stages through HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI

from app.security import Principal, Role
from app.services import orders as orders_service
from tests.auth import bearer
from tests.factories import ADMIN, make_contact, unique_email
from tests.routers.test_contacts import assert_problem

INTEGRATION = bearer(Role.INTEGRATION, subject="backoffice")


def order(contact: dict[str, Any], *, days_ago: float = 1, status: str = "paid", total: str = "49.90",
          currency: str = "EUR") -> dict[str, Any]:
    return {
        "contact": contact, "placed_at": (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(),
        "status": status, "currency": currency, "total_amount": total, "channel": "web",
        "items": [{"sku": "TSHIRT-M", "name": "T-shirt", "category": "apparel", "quantity": 1, "unit_price": total}],
    }


async def put(client: httpx.AsyncClient, external_id: str, body: dict[str, Any]) -> httpx.Response:
    return await client.put(f"/v1/orders/{external_id}", json=body, headers=INTEGRATION)


async def contact_of(client: httpx.AsyncClient, contact_id: str) -> dict[str, Any]:
    return (await client.get(f"/v1/contacts/{contact_id}", headers=ADMIN)).json()  # type: ignore[no-any-return]


class TestPutOrder:
    async def test_replayed_three_times_is_one_order(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        body = order({"id": contact["id"]})
        statuses = [(await put(client, "O-1", body)).status_code for _ in range(3)]
        assert statuses == [201, 200, 200]
        page = (await client.get(f"/v1/contacts/{contact['id']}/orders", headers=ADMIN)).json()
        assert [o["external_id"] for o in page["data"]] == ["O-1"]
        after = await contact_of(client, contact["id"])
        assert after["stats"]["orders_count"] == 1 and after["version"] == 2  # one stats write, not three

    async def test_unknown_email_creates_a_checkout_contact(self, client: httpx.AsyncClient) -> None:
        email = unique_email()
        response = await put(client, "O-2", order({"email": email}))
        assert response.status_code == 201
        found = (await client.get("/v1/contacts", params={"email": email}, headers=ADMIN)).json()["data"]
        assert [c["source"] for c in found] == ["checkout"]
        assert found[0]["stats"]["total_spent"] == "49.90" and found[0]["lifecycle_stage"] == "new_customer"

    async def test_money_is_decimal_and_stats_follow(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        await put(client, "A", order({"id": contact["id"]}, total="10.10", days_ago=3))
        await put(client, "B", order({"id": contact["id"]}, total="20.20", days_ago=2))
        stats = (await contact_of(client, contact["id"]))["stats"]
        assert (stats["orders_count"], stats["total_spent"], stats["average_basket"]) == (2, "30.30", "15.15")
        assert stats["last_order_amount"] == "20.20" and stats["currency"] == "EUR"
        stored = (await client.get("/v1/orders/A", headers=ADMIN)).json()
        assert stored["total_amount"] == "10.10"

    async def test_refund_moves_stats_back(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        await put(client, "R1", order({"id": contact["id"]}, total="30.00", days_ago=5))
        await put(client, "R2", order({"id": contact["id"]}, total="70.00", days_ago=1))
        await put(client, "R2", order({"id": contact["id"]}, total="70.00", days_ago=1, status="refunded"))
        stats = (await contact_of(client, contact["id"]))["stats"]
        assert (stats["orders_count"], stats["total_spent"], stats["last_order_amount"]) == (1, "30.00", "30.00")

    async def test_bad_orders_are_422_naming_the_field(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        cases = [
            ({**order({"id": contact["id"]}), "total_amount": "12.345"}, "total_amount"),
            ({**order({"id": contact["id"]}), "total_amount": "-1"}, "total_amount"),
            ({**order({"id": contact["id"]}), "currency": "euro"}, "currency"),
            ({**order({"id": contact["id"]}), "status": "lost"}, "status"),
            ({**order({"id": contact["id"]}), "placed_at": "2026-01-01T10:00:00"}, "body"),
            (order({}), "contact"),
            (order({"id": "00000000-0000-0000-0000-000000000000"}), "contact.id"),
            (order({"external_id": "nobody"}), "contact.external_id"),
        ]
        for body, field in cases:
            assert_problem(await put(client, "BAD", body), 422, field)
        assert_problem(await client.get("/v1/orders/BAD", headers=ADMIN), 404)


class TestLifecycle:
    async def test_prospect_new_loyal_lapsed(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        ref = {"id": contact["id"]}
        assert (await contact_of(client, contact["id"]))["lifecycle_stage"] == "prospect"
        await put(client, "L1", order(ref, days_ago=30))
        assert (await contact_of(client, contact["id"]))["lifecycle_stage"] == "new_customer"
        await put(client, "L2", order(ref, days_ago=20))
        await put(client, "L3", order(ref, days_ago=10))
        assert (await contact_of(client, contact["id"]))["lifecycle_stage"] == "loyal_customer"
        for i, days in enumerate((30, 20, 10), start=1):  # the same orders, placed long ago
            await put(client, f"L{i}", order(ref, days_ago=400 + days))
        assert (await contact_of(client, contact["id"]))["lifecycle_stage"] == "lapsed_customer"
        history = (await client.get(f"/v1/contacts/{contact['id']}/history", headers=ADMIN)).json()["data"]
        stages = [(h["old_value"], h["new_value"]) for h in history if h["field"] == "lifecycle_stage"]
        # moving the orders back one by one: fewer recent orders (new), then none for a year (lapsed)
        assert stages[::-1] == [("prospect", "new_customer"), ("new_customer", "loyal_customer"),
                                ("loyal_customer", "new_customer"), ("new_customer", "lapsed_customer")]

    async def test_stages_age_with_time_alone_and_the_job_is_idempotent(
        self, client: httpx.AsyncClient, app: FastAPI, sessions: Any
    ) -> None:
        contact = await make_contact(client)
        await put(client, "T1", order({"id": contact["id"]}, days_ago=100))
        policy = orders_service.LifecyclePolicy(lapsed_after_days=90)
        actor = Principal("lifecycle-job", Role.ADMIN, frozenset(), "job")
        async with sessions.begin() as session:
            first = await orders_service.refresh_aged_stages(session, policy=policy, actor=actor)
        async with sessions.begin() as session:
            second = await orders_service.refresh_aged_stages(session, policy=policy, actor=actor)
        assert (first, second) == (1, 0)
        assert (await contact_of(client, contact["id"]))["lifecycle_stage"] == "lapsed_customer"


class TestEvents:
    async def test_event_id_makes_events_idempotent_and_activity_follows(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        at = "2026-11-01T10:00:00+00:00"
        body = {"contact": {"id": contact["id"]}, "type": "page_view", "occurred_at": at,
                "properties": {"url": "/shoes"}, "event_id": "ev-1"}
        first = await client.post("/v1/events", json=body, headers=INTEGRATION)
        again = await client.post("/v1/events", json=body, headers=INTEGRATION)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json()["id"] == first.json()["id"]
        page = (await client.get(f"/v1/contacts/{contact['id']}/events", headers=ADMIN)).json()
        assert [e["type"] for e in page["data"]] == ["page_view"]
        assert (await contact_of(client, contact["id"]))["last_activity_at"] == "2026-11-01T10:00:00Z"

    async def test_batch_items_fail_alone(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        ok = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        items = [ok, {**ok, "type": "Bad Type"}, {**ok, "contact": {"email": unique_email()}}]
        body = (await client.post("/v1/events/batch", json={"items": items}, headers=INTEGRATION)).json()
        assert [r["status"] for r in body["results"]] == ["created", "error", "created"]
        assert body["results"][1]["error"]["errors"][0]["field"] == "type"

    async def test_viewer_cannot_write_orders_or_events(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        viewer = bearer(Role.VIEWER)
        assert (await client.put("/v1/orders/V1", json=order({"id": contact["id"]}), headers=viewer)).status_code == 403
        event = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        assert (await client.post("/v1/events", json=event, headers=viewer)).status_code == 403
