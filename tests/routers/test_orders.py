"""Orders, events, stats and lifecycle stages through HTTP."""

from __future__ import annotations

import json
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
            ({**order({"id": contact["id"]}), "placed_at": "2026-01-01T10:00:00"}, "placed_at"),
            (order({}), "contact"),
            (order({"id": "00000000-0000-0000-0000-000000000000"}), "contact.id"),
            (order({"external_id": "nobody"}), "contact.external_id"),
        ]
        for body, field in cases:
            assert_problem(await put(client, "BAD", body), 422, field)
        assert_problem(await client.get("/v1/orders/BAD", headers=ADMIN), 404)


class TestStatsBounds:
    """total_spent is numeric(14, 2), as an order's amount: two orders of 999,999,999,999.99 summed past it, and
    the stats write answered 500 (SQLSTATE 22003) after the order was written in the same transaction."""

    async def test_an_order_taking_total_spent_past_its_column_is_422_and_nothing_is_written(
        self, client: httpx.AsyncClient
    ) -> None:
        contact = await make_contact(client)
        ref = {"id": contact["id"]}
        assert (await put(client, "BIG-1", order(ref, total="999999999999.99", days_ago=2))).status_code == 201
        problem = assert_problem(await put(client, "BIG-2", order(ref, total="0.01")), 422, "total_amount")
        assert problem["errors"][0]["code"] == "total_spent_out_of_range"
        assert_problem(await client.get("/v1/orders/BIG-2", headers=ADMIN), 404)
        # a cancelled one counts once it is paid: the same refusal, and the order keeps its status
        assert (await put(client, "BIG-3", order(ref, total="5.00", status="cancelled"))).status_code == 201
        assert_problem(await put(client, "BIG-3", order(ref, total="5.00")), 422, "total_amount")
        assert (await client.get("/v1/orders/BIG-3", headers=ADMIN)).json()["status"] == "cancelled"
        stats = (await contact_of(client, contact["id"]))["stats"]
        assert (stats["orders_count"], stats["total_spent"]) == (1, "999999999999.99")

    async def test_a_merge_taking_total_spent_past_its_column_is_422_and_nothing_moves(
        self, client: httpx.AsyncClient
    ) -> None:
        survivor, duplicate = await make_contact(client), await make_contact(client)
        assert (await put(client, "M-BIG", order({"id": survivor["id"]}, total="999999999999.99"))).status_code == 201
        assert (await put(client, "M-ONE", order({"id": duplicate["id"]}, total="1.00"))).status_code == 201
        merged = await client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                   headers=ADMIN)
        assert_problem(merged, 422, "duplicate_id")
        assert (await client.get("/v1/orders/M-ONE", headers=ADMIN)).json()["contact_id"] == duplicate["id"]
        assert (await contact_of(client, duplicate["id"]))["stats"]["total_spent"] == "1.00"


class TestMixedCurrencies:
    async def test_one_order_in_another_currency_keeps_the_count_and_the_stage_and_moves_the_money(
        self, client: httpx.AsyncClient
    ) -> None:
        """The stats counted only the orders in the latest order's currency: one order paid in dollars made a loyal
        customer of three euro orders a new customer with one order, first ordering today."""
        contact = await make_contact(client)
        ref = {"id": contact["id"]}
        for i, days in enumerate((30, 20, 10)):
            assert (await put(client, f"MC-{i}", order(ref, days_ago=days, total="10.00"))).status_code == 201
        assert (await put(client, "MC-USD", order(ref, days_ago=1, total="7.50", currency="USD"))).status_code == 201
        after = await contact_of(client, contact["id"])
        stats, first = after["stats"], (await client.get("/v1/orders/MC-0", headers=ADMIN)).json()
        assert (stats["orders_count"], after["lifecycle_stage"]) == (4, "loyal_customer")
        assert stats["first_order_at"] == first["placed_at"]
        # money is never summed across currencies: that of the latest order, over the orders paid in it
        assert (stats["currency"], stats["total_spent"], stats["average_basket"], stats["last_order_amount"]) == (
            "USD", "7.50", "7.50", "7.50")
        segment = {"field": "stats.orders_count", "op": "eq", "value": 4}
        by_stats = await client.post("/v1/segments/preview", json={"filter": segment}, headers=ADMIN)
        by_orders = await client.post("/v1/segments/preview", headers=ADMIN, json={
            "filter": {"field": "orders.count", "op": "eq", "value": 4}})
        assert [c["id"] for c in by_stats.json()["data"]] == [c["id"] for c in by_orders.json()["data"]] == [
            contact["id"]]


class TestAverageBasket:
    async def test_a_half_cent_rounds_away_from_zero_as_postgresql_rounds(self, client: httpx.AsyncClient) -> None:
        """0.05 over 2 orders is 0.025: Python's round() gave 0.02 (half to even), where round(numeric) in SQL, a
        spreadsheet or a till give 0.03: a BI report recomputing the basket disagreed with the stored one."""
        contact = await make_contact(client)
        for external_id, total in (("HALF-1", "0.02"), ("HALF-2", "0.03")):
            assert (await put(client, external_id, order({"id": contact["id"]}, total=total))).status_code == 201
        assert (await contact_of(client, contact["id"]))["stats"]["average_basket"] == "0.03"


class TestExternalIdInThePath:
    async def test_trimmed_as_in_a_body_and_never_blank(self, client: httpx.AsyncClient) -> None:
        """The contract declares external ids non-blank, and bodies trim text (`cart_external_id`): the {external_id}
        of the URL must neither make a blank order nor a cart that an order naming it never finds."""
        contact = await make_contact(client)
        assert_problem(await put(client, "%20", order({"id": contact["id"]})), 422, "external_id")
        lines = [{"sku": "A", "quantity": 1, "unit_price": "49.90"}]
        made = await client.put("/v1/carts/%20K-PAD%20", headers=INTEGRATION, json={
            "contact": {"id": contact["id"]}, "currency": "EUR", "items": lines, "opened_at": "2026-11-20T14:03:00Z"})
        assert (made.status_code, made.json()["external_id"]) == (201, "K-PAD"), made.text
        placed = await put(client, "O-PAD", {**order({"id": contact["id"]}), "cart_external_id": " K-PAD "})
        assert placed.status_code == 201, placed.text
        cart = (await client.get("/v1/carts/K-PAD", headers=ADMIN)).json()
        assert (cart["status"], cart["order_external_id"]) == ("converted", "O-PAD")


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


TOO_LATE = "9999-12-31T23:59:59-23:59"  # year 10000 in UTC
TOO_EARLY = "0001-01-01T00:00:00+23:59"  # year 0 in UTC


class TestContactReference:
    async def test_an_order_by_email_keeps_the_contacts_external_id(self, client: httpx.AsyncClient) -> None:
        # Audit: the reference was upserted with external_id=None, which erased the stored one.
        contact = await make_contact(client, external_id="SHOP-7", first_name="Léa")
        assert (await put(client, "REF-1", order({"email": contact["email"]}))).status_code == 201
        after = await contact_of(client, contact["id"])
        assert (after["external_id"], after["first_name"]) == ("SHOP-7", "Léa")
        history = (await client.get(f"/v1/contacts/{contact['id']}/history", headers=ADMIN)).json()["data"]
        assert "external_id" not in {h["field"] for h in history if h["via"] == "checkout"}

    async def test_events_by_email_keep_the_contacts_external_id(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, external_id="SHOP-8")
        event = {"contact": {"email": contact["email"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        assert (await client.post("/v1/events", json=event, headers=INTEGRATION)).status_code == 201
        batch = await client.post("/v1/events/batch", json={"items": [event]}, headers=INTEGRATION)
        assert [r["status"] for r in batch.json()["results"]] == ["created"]
        assert (await contact_of(client, contact["id"]))["external_id"] == "SHOP-8"

    async def test_a_merged_contact_is_followed_to_its_survivor_an_erased_one_is_422(
        self, client: httpx.AsyncClient
    ) -> None:
        # Issue 21: the merge moved the person's orders and events to the survivor; a late one goes there too.
        survivor, duplicate, erased = [await make_contact(client) for _ in range(3)]
        merged = await client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                   headers=ADMIN)
        assert merged.status_code == 200
        assert (await put(client, "LATE-1", order({"id": duplicate["id"]}))).json()["contact_id"] == survivor["id"]
        event = {"contact": {"id": duplicate["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        created = await client.post("/v1/events", json=event, headers=INTEGRATION)
        assert created.json()["contact_id"] == survivor["id"]
        assert (await contact_of(client, survivor["id"]))["stats"]["orders_count"] == 1
        assert (await client.delete(f"/v1/contacts/{erased['id']}", headers=ADMIN)).status_code == 204
        gone = await put(client, "LATE-2", order({"id": erased["id"]}))
        assert assert_problem(gone, 422, "contact.id")["errors"][0]["code"] == "unknown_contact"


class TestTimestampRange:
    """An offset that pushes a timestamp outside years 1-9999 in UTC (what timestamptz stores): 422, never 500."""

    async def test_placed_at_outside_the_range_is_422(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        # the two ends themselves: asyncpg would store them as -infinity/infinity, read back without an offset
        for moment in (TOO_LATE, TOO_EARLY, "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"):
            assert_problem(await put(client, "RANGE", {**order({"id": contact["id"]}), "placed_at": moment}), 422,
                           "placed_at")
        assert_problem(await client.get("/v1/orders/RANGE", headers=ADMIN), 404)

    async def test_occurred_at_outside_the_range_is_422_alone_or_in_a_batch(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        for moment in (TOO_LATE, TOO_EARLY):
            event = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": moment}
            assert_problem(await client.post("/v1/events", json=event, headers=INTEGRATION), 422, "occurred_at")
            batch = (await client.post("/v1/events/batch", json={"items": [event]}, headers=INTEGRATION)).json()
            assert batch["results"][0]["error"]["errors"][0]["field"] == "occurred_at"

    async def test_a_time_zone_is_required_and_the_edges_are_stored_in_utc(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        naive = {**order({"id": contact["id"]}), "placed_at": "2026-01-01T10:00:00"}
        assert_problem(await put(client, "EDGE", naive), 422, "placed_at")
        for moment, stored in (("0001-01-01T23:59:01+23:59", "0001-01-01T00:00:01Z"),):  # the far end: TestFuture
            response = await put(client, "EDGE", {**order({"id": contact["id"]}), "placed_at": moment})
            assert response.status_code in (200, 201), response.text
            assert response.json()["placed_at"] == stored
            assert (await client.get("/v1/orders/EDGE", headers=ADMIN)).json()["placed_at"] == stored

    async def test_a_forged_order_cursor_outside_the_range_is_422(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        cursor = f"{TOO_LATE}|00000000-0000-0000-0000-000000000000"
        response = await client.get(f"/v1/contacts/{contact['id']}/orders", params={"cursor": cursor}, headers=ADMIN)
        assert_problem(response, 422, "cursor")


class TestFuture:
    """An order, event or cart dated years ahead was stored: its contact's last order stayed "in the future", so it
    never became lapsed_customer, and `within_days` counted it for years. At most a day ahead of Carnet's clock
    (a shop clock or time zone gone wrong), else 422 naming the field (docs/api.md, "Orders, carts and events")."""

    async def test_orders_events_and_carts_a_day_ahead_at_most(self, client: httpx.AsyncClient) -> None:
        from tests.routers.test_carts import cart
        from tests.routers.test_carts import put as put_cart

        contact = await make_contact(client)
        ref = {"id": contact["id"]}
        soon, late = -0.9, -1.1  # days ago: within the skew, past it
        assert (await put(client, "SOON", order(ref, days_ago=soon))).status_code == 201
        for moment in (order(ref, days_ago=late)["placed_at"], "2031-01-01T00:00:00Z"):
            body = assert_problem(await put(client, "LATE", {**order(ref), "placed_at": moment}), 422, "placed_at")
            assert body["errors"][0]["code"] == "in_future"
        assert_problem(await client.get("/v1/orders/LATE", headers=ADMIN), 404)

        event = {"contact": ref, "type": "call", "occurred_at": order(ref, days_ago=soon)["placed_at"]}
        assert (await client.post("/v1/events", json=event, headers=INTEGRATION)).status_code == 201
        event["occurred_at"] = order(ref, days_ago=late)["placed_at"]
        assert_problem(await client.post("/v1/events", json=event, headers=INTEGRATION), 422, "occurred_at")
        batch = (await client.post("/v1/events/batch", json={"items": [event]}, headers=INTEGRATION)).json()
        assert batch["results"][0]["error"]["errors"][0]["field"] == "occurred_at"

        assert (await put_cart(client, "CART-SOON", cart(ref, days_ago=soon))).status_code == 201
        assert_problem(await put_cart(client, "CART-LATE", cart(ref, days_ago=late)), 422, "opened_at")
        closed = cart(ref, status="abandoned", closed_at=order(ref, days_ago=late)["placed_at"])
        assert_problem(await put_cart(client, "CART-LATE", closed), 422, "closed_at")
        after = await contact_of(client, contact["id"])
        assert after["stats"]["orders_count"] == 1

    async def test_the_bound_is_declared(self, client: httpx.AsyncClient) -> None:
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
        for schema, field in (("OrderPut", "placed_at"), ("EventCreate", "occurred_at"), ("CartPut", "opened_at")):
            assert "1 day" in schemas[schema]["properties"][field]["description"], (schema, field)


class TestCurrency:
    async def test_only_iso_4217_codes_are_accepted(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        for code in ("XYZ", "EUX", "ABC"):
            assert_problem(await put(client, f"CUR-{code}", order({"id": contact["id"]}, currency=code)), 422,
                           "currency")
        for code in ("EUR", "CHF", "JPY", "XOF", "HRK", "BGN"):  # HRK, BGN: past orders from before the euro
            assert (await put(client, f"CUR-{code}", order({"id": contact["id"]}, currency=code))).status_code == 201


class TestOrderETag:
    async def test_get_and_put_carry_an_etag_that_if_match_checks(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        body = order({"id": contact["id"]}, total="10.00")
        created = await put(client, "ET-1", body)
        etag = created.headers["etag"]
        read = await client.get("/v1/orders/ET-1", headers=ADMIN)
        assert read.headers["etag"] == etag
        replay = await client.put("/v1/orders/ET-1", json=body, headers={**INTEGRATION, "If-Match": etag})
        assert (replay.status_code, replay.headers["etag"]) == (200, etag)  # a replay changes nothing

        changed = await client.put("/v1/orders/ET-1", json=order({"id": contact["id"]}, total="12.00"),
                                   headers={**INTEGRATION, "If-Match": etag})
        assert changed.status_code == 200, changed.text
        assert changed.headers["etag"] != etag
        assert (await client.get("/v1/orders/ET-1", headers=ADMIN)).headers["etag"] == changed.headers["etag"]

        stale = await client.put("/v1/orders/ET-1", json=order({"id": contact["id"]}, total="99.00"),
                                 headers={**INTEGRATION, "If-Match": etag})
        assert_problem(stale, 412)
        assert (await client.get("/v1/orders/ET-1", headers=ADMIN)).json()["total_amount"] == "12.00"
        assert (await contact_of(client, contact["id"]))["stats"]["total_spent"] == "12.00"

    async def test_if_match_on_an_order_that_does_not_exist_is_412(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        response = await client.put("/v1/orders/ET-NEW", json=order({"id": contact["id"]}),
                                    headers={**INTEGRATION, "If-Match": '"v1"'})
        assert_problem(response, 412)
        assert_problem(await client.get("/v1/orders/ET-NEW", headers=ADMIN), 404)
        star = await client.put("/v1/orders/ET-NEW", json=order({"id": contact["id"]}),
                                headers={**INTEGRATION, "If-Match": "*"})
        assert star.status_code == 201


class TestEventIdempotency:
    async def test_same_key_and_body_replays_the_first_event(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        headers = {**INTEGRATION, "Idempotency-Key": "ev-key-1"}
        body = {"contact": {"id": contact["id"]}, "type": "page_view", "occurred_at": "2026-11-01T10:00:00Z"}
        first = await client.post("/v1/events", json=body, headers=headers)
        again = await client.post("/v1/events", json=body, headers=headers)
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert_problem(await client.post("/v1/events", json={**body, "type": "call"}, headers=headers), 422,
                       "Idempotency-Key")
        page = (await client.get(f"/v1/contacts/{contact['id']}/events", headers=ADMIN)).json()
        assert len(page["data"]) == 1

    async def test_same_key_and_body_replays_the_first_batch(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        headers = {**INTEGRATION, "Idempotency-Key": "ev-batch-key-1"}
        item = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        first = await client.post("/v1/events/batch", json={"items": [item, item]}, headers=headers)
        again = await client.post("/v1/events/batch", json={"items": [item, item]}, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        page = (await client.get(f"/v1/contacts/{contact['id']}/events", headers=ADMIN)).json()
        assert len(page["data"]) == 2


class TestOrderPages:
    async def test_next_cursor_works_pasted_into_the_url_as_given(self, client: httpx.AsyncClient) -> None:
        """Every other next_cursor is URL-safe (base64url or digits); an order's must be too: a client that appends
        it to `?cursor=` as given (a JS template string) must get the next page, not a 422 (`+` reads as a space)."""
        contact = await make_contact(client)
        for n in range(3):
            assert (await put(client, f"PAGE-{n}", order({"id": contact["id"]}, days_ago=n + 1))).status_code == 201
        seen: list[str] = []
        url = f"/v1/contacts/{contact['id']}/orders?limit=1"
        while True:
            page = await client.get(url, headers=ADMIN)
            assert page.status_code == 200, page.text
            seen += [o["external_id"] for o in page.json()["data"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
            url = f"/v1/contacts/{contact['id']}/orders?limit=1&cursor={cursor}"
        assert seen == ["PAGE-0", "PAGE-1", "PAGE-2"]


class TestEventPages:
    async def test_cursor_beyond_int64_is_422(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        for cursor in ("9223372036854775808", "99999999999999999999"):
            response = await client.get(f"/v1/contacts/{contact['id']}/events", params={"cursor": cursor},
                                        headers=ADMIN)
            assert_problem(response, 422, "cursor")
        largest = await client.get(f"/v1/contacts/{contact['id']}/events", params={"cursor": "9223372036854775807"},
                                   headers=ADMIN)
        assert largest.status_code == 200

    async def test_batch_items_that_are_not_objects_fail_alone(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        ok = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        response = await client.post("/v1/events/batch", json={"items": [None, ok, "x", [1]]}, headers=INTEGRATION)
        assert response.status_code == 200, response.text
        body = response.json()
        assert [r["status"] for r in body["results"]] == ["error", "created", "error", "error"]
        assert body["errors"] == 3
        assert body["results"][0]["error"]["status"] == 422


def nested(depth: int, leaf: Any = "x") -> Any:
    """`{"a": {"a": ... leaf}}`, `depth` objects deep."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


DEEP = "__deep__"  # raw_json() writes a `nested(deep)` object in its place, however deep


def raw_json(body: Any, headers: dict[str, str] | None = None, *, deep: int = 0) -> dict[str, Any]:
    """`content=` and headers for a body httpx would not encode itself: a lone surrogate (as `\\ud800`), or
    `DEEP` replaced by an object nested `deep` levels (json.dumps would recurse)."""
    text = json.dumps(body).replace(f'"{DEEP}"', '{"a":' * deep + '"x"' + "}" * deep)
    return {"content": text, "headers": {**(headers or INTEGRATION), "Content-Type": "application/json"}}


class TestFreeFormProperties:
    """Audit: deep or unencodable `properties` were stored, then broke every read of the person's events."""

    async def test_too_deep_properties_are_422_and_nothing_is_stored(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        event = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        for depth in (33, 252, 260):
            response = await client.post("/v1/events", **raw_json({**event, "properties": DEEP}, deep=depth))
            assert_problem(response, 422, "properties")
        # deeper than Python's JSON parser goes: a malformed body (json_invalid), answered before any route runs
        assert_problem(await client.post("/v1/events", **raw_json({**event, "properties": DEEP}, deep=2000)), 422,
                       "body")
        batch = await client.post("/v1/events/batch", **raw_json({"items": [{**event, "properties": DEEP}]}, deep=300))
        assert batch.status_code == 200, batch.text
        assert batch.json()["results"][0]["error"]["errors"][0]["field"] == "properties"
        big = await client.post("/v1/events", json={**event, "properties": {"note": "x" * 17_000}}, headers=INTEGRATION)
        assert_problem(big, 422, "properties")  # over 16 kB: the field is named, not `body`
        ok = await client.post("/v1/events", json={**event, "properties": nested(31)}, headers=INTEGRATION)
        assert ok.status_code == 201, ok.text
        for path in ("events", "timeline", "export"):
            response = await client.get(f"/v1/contacts/{contact['id']}/{path}", headers=ADMIN)
            assert response.status_code == 200, (path, response.text)
        events = (await client.get(f"/v1/contacts/{contact['id']}/events", headers=ADMIN)).json()["data"]
        assert len(events) == 1

    async def test_lone_surrogates_and_nul_are_422(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        event = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z"}
        for properties in ({"k": "\ud800"}, {"\udfff": 1}, {"k": ["ok", {"deep": "a\x00b"}]}, {"k\x00": 1}):
            response = await client.post("/v1/events", **raw_json({**event, "properties": properties}))
            assert_problem(response, 422, "properties")

    async def test_the_text_backslash_x00_is_not_a_nul(self, client: httpx.AsyncClient) -> None:
        # a repr-based NUL check once refused it: `\\x00` as four characters is ordinary text
        contact = await make_contact(client)
        event = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z",
                 "properties": {"path": "C:\\x00dir", "\\x00": "\\x00"}}
        response = await client.post("/v1/events", json=event, headers=INTEGRATION)
        assert response.status_code == 201, response.text
        stored = (await client.get(f"/v1/contacts/{contact['id']}/events", headers=ADMIN)).json()["data"]
        assert stored[0]["properties"] == event["properties"]

    async def test_viewer_sees_properties_masked(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        properties = {"email": "claire.martin@example.com", "items": [{"sku": "A1", "qty": 2}], "paid": True,
                      "note": None, "empty": ""}
        event = {"contact": {"id": contact["id"]}, "type": "call", "occurred_at": "2026-11-02T09:00:00Z",
                 "properties": properties}
        assert (await client.post("/v1/events", json=event, headers=INTEGRATION)).status_code == 201
        viewer = bearer(Role.VIEWER)
        masked = {"email": "***", "items": [{"sku": "***", "qty": 2}], "paid": True, "note": None, "empty": ""}
        seen = (await client.get(f"/v1/contacts/{contact['id']}/events", headers=viewer)).json()["data"]
        assert seen[0]["properties"] == masked
        timeline = (await client.get(f"/v1/contacts/{contact['id']}/timeline", headers=viewer)).json()["data"]
        assert next(e for e in timeline if e["kind"] == "event")["data"]["properties"] == masked
        assert "claire.martin" not in (await client.get(f"/v1/contacts/{contact['id']}/timeline",
                                                        headers=viewer)).text
        full = (await client.get(f"/v1/contacts/{contact['id']}/events", headers=ADMIN)).json()["data"]
        assert full[0]["properties"] == properties
