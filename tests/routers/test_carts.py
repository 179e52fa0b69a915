"""Carts through HTTP: upsert and replay, conversion by an order, strict input, timeline, segments, erasure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.factories import ADMIN, make_contact
from tests.routers.test_contacts import assert_problem
from tests.routers.test_orders import INTEGRATION, order
from tests.routers.test_orders import put as put_order
from tests.routers.test_segments import matching_ids


def cart(contact: dict[str, Any], *, status: str = "open", days_ago: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {
        "contact": contact, "status": status, "currency": "EUR",
        "opened_at": (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(),
        "checkout_url": "https://shop.example/cart/recover/abc",
        "items": [{"sku": "MUG-1", "name": "Mug", "category": "kitchen", "quantity": 2, "unit_price": "12.50"},
                  {"sku": "TEA-9", "name": "Tea", "quantity": 1, "unit_price": "4.90"}],
        **extra,
    }


def ext() -> str:
    return f"C-{uuid.uuid4().hex[:10]}"


async def put(client: httpx.AsyncClient, external_id: str, body: dict[str, Any],
              headers: dict[str, str] = INTEGRATION) -> httpx.Response:
    return await client.put(f"/v1/carts/{external_id}", json=body, headers=headers)


class TestPutCart:
    async def test_created_replayed_and_read(self, client: httpx.AsyncClient) -> None:
        contact, cart_id = await make_contact(client), ext()
        body = cart({"id": contact["id"]})
        statuses = [(await put(client, cart_id, body)).status_code for _ in range(3)]
        assert statuses == [201, 200, 200]
        read = await client.get(f"/v1/carts/{cart_id}", headers=INTEGRATION)
        assert read.status_code == 200 and read.headers["etag"]
        got = read.json()
        assert got["status"] == "open" and got["total_amount"] == "29.90" and got["closed_at"] is None
        assert got["contact_id"] == contact["id"] and got["checkout_url"].endswith("/abc")

    async def test_a_malformed_if_match_is_422_a_stale_one_412(self, client: httpx.AsyncClient) -> None:
        """The contract declares If-Match's form: another form is bad input (422 naming it), not a failed
        precondition; a well-formed ETag that is not current is the 412."""
        contact, cart_id = await make_contact(client), ext()
        body = cart({"id": contact["id"]}, items=[{"sku": "MUG-1", "quantity": 2.0, "unit_price": "12.50"}])
        for malformed in ("m~TXU\t)-Cd,|$1", '"x"', "v1", '"v1", "v2"'):
            refused = await put(client, cart_id, body, headers={**INTEGRATION, "If-Match": malformed})
            assert refused.status_code == 422, (malformed, refused.text)
            assert [e["field"] for e in refused.json()["errors"]] == ["If-Match"]
        assert_problem(await put(client, cart_id, body, headers={**INTEGRATION, "If-Match": '"v1"'}), 412)
        assert (await put(client, cart_id, body)).status_code == 201
        current = (await client.get(f"/v1/carts/{cart_id}", headers=INTEGRATION)).headers["etag"]
        assert (await put(client, cart_id, body, headers={**INTEGRATION, "If-Match": current})).status_code == 200

    async def test_abandoned_then_back_open(self, client: httpx.AsyncClient) -> None:
        contact, cart_id = await make_contact(client), ext()
        await put(client, cart_id, cart({"id": contact["id"]}))
        abandoned = (await put(client, cart_id, cart({"id": contact["id"]}, status="abandoned"))).json()
        assert abandoned["status"] == "abandoned" and abandoned["closed_at"] is not None
        back = (await put(client, cart_id, cart({"id": contact["id"]}))).json()
        assert back["status"] == "open" and back["closed_at"] is None

    async def test_an_order_naming_it_converts_it(self, client: httpx.AsyncClient) -> None:
        contact, cart_id = await make_contact(client), ext()
        await put(client, cart_id, cart({"id": contact["id"]}))
        placed = await put_order(client, f"O-{cart_id}", {**order({"id": contact["id"]}), "cart_external_id": cart_id})
        assert placed.status_code == 201 and placed.json()["cart_external_id"] == cart_id
        got = (await client.get(f"/v1/carts/{cart_id}", headers=INTEGRATION)).json()
        assert got["status"] == "converted" and got["order_external_id"] == f"O-{cart_id}" and got["closed_at"]
        # Closed: a late update from the shop is refused, a replay of the order changes nothing.
        assert_problem(await put(client, cart_id, cart({"id": contact["id"]})), 409)
        again = await put_order(client, f"O-{cart_id}", {**order({"id": contact["id"]}), "cart_external_id": cart_id})
        assert again.status_code == 200

    async def test_an_order_cannot_close_another_persons_cart(self, client: httpx.AsyncClient) -> None:
        owner, other, cart_id = await make_contact(client), await make_contact(client), ext()
        await put(client, cart_id, cart({"id": owner["id"]}))
        response = await put_order(client, f"O-{cart_id}", {**order({"id": other["id"]}), "cart_external_id": cart_id})
        assert_problem(response, 422, "cart_external_id")
        assert (await client.get(f"/v1/carts/{cart_id}", headers=INTEGRATION)).json()["status"] == "open"

    async def test_an_unknown_cart_on_an_order_is_accepted(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        response = await put_order(client, ext(), {**order({"id": contact["id"]}), "cart_external_id": ext()})
        assert response.status_code == 201

    async def test_strict_input_names_the_field(self, client: httpx.AsyncClient) -> None:
        contact = {"id": (await make_contact(client))["id"]}
        cases = {
            "status": cart(contact, status="lost"),
            "items": cart(contact, items=[]),
            "items.0.quantity": cart(contact, items=[{"sku": "A", "quantity": 0, "unit_price": "1"}]),
            "items.0.unit_price": cart(contact, items=[{"sku": "A", "quantity": 1, "unit_price": "1.001"}]),
            "checkout_url": cart(contact, checkout_url="javascript:alert(1)"),
            "currency": cart(contact, currency="EURO"),
            "colour": cart(contact, colour="red"),
        }
        for field, body in cases.items():
            problem = assert_problem(await put(client, ext(), body), 422)
            assert any(e["field"].startswith(field) for e in problem["errors"]), (field, problem)
        too_many = cart(contact, items=[{"sku": "A", "quantity": 1, "unit_price": "1"}] * 1001)
        assert_problem(await put(client, ext(), too_many), 422)
        huge = cart(contact, items=[{"sku": "A", "quantity": 1_000_000, "unit_price": "999999999999.99"}])
        # the lines' total would not fit numeric(14, 2): the field to give is named (docs/api.md, Errors)
        assert_problem(await put(client, ext(), huge), 422, "total_amount")
        closed_open = cart(contact, closed_at=datetime.now(UTC).isoformat())
        assert_problem(await put(client, ext(), closed_open), 422, "closed_at")
        before = cart(contact, status="abandoned", opened_at="2026-11-20T14:03:00Z", closed_at="2026-11-19T14:03:00Z")
        assert_problem(await put(client, ext(), before), 422, "closed_at")
        assert (await client.get(f"/v1/carts/{ext()}", headers=INTEGRATION)).status_code == 404

    async def test_scopes(self, client: httpx.AsyncClient) -> None:
        from app.security import Role
        from tests.auth import bearer

        contact, cart_id = await make_contact(client), ext()
        reader = bearer(Role.VIEWER, subject="viewer")
        assert (await put(client, cart_id, cart({"id": contact["id"]}), headers=reader)).status_code == 403
        await put(client, cart_id, cart({"id": contact["id"]}))
        assert (await client.get(f"/v1/carts/{cart_id}", headers=reader)).status_code == 200


class TestCartsElsewhere:
    async def test_timeline_shows_the_cart(self, client: httpx.AsyncClient) -> None:
        contact, cart_id = await make_contact(client), ext()
        await put(client, cart_id, cart({"id": contact["id"]}, status="abandoned"))
        rows = (await client.get(f"/v1/contacts/{contact['id']}/timeline", headers=ADMIN)).json()["data"]
        carts = [r for r in rows if r["kind"] == "cart"]
        assert [c["data"]["external_id"] for c in carts] == [cart_id]
        assert carts[0]["data"]["status"] == "abandoned" and carts[0]["data"]["total_amount"] == "29.90"

    async def test_segment_on_cart_status_within_days(self, client: httpx.AsyncClient) -> None:
        recent, old, converted = [await make_contact(client) for _ in range(3)]
        await put(client, ext(), cart({"id": recent["id"]}, status="abandoned", days_ago=2))
        await put(client, ext(), cart({"id": old["id"]}, status="abandoned", days_ago=30))
        await put(client, ext(), cart({"id": converted["id"]}, status="converted", days_ago=2))
        found = await matching_ids(client, {"field": "carts.status", "op": "eq", "value": "abandoned",
                                            "within_days": 7})
        assert recent["id"] in found and old["id"] not in found and converted["id"] not in found
        either = await matching_ids(client, {"field": "carts.status", "op": "in", "value": ["abandoned", "converted"],
                                             "count": {"op": "gte", "value": 1}})
        assert {recent["id"], old["id"], converted["id"]} <= either
        bad = await client.post("/v1/segments/preview", headers=ADMIN,
                                json={"filter": {"field": "carts.status", "op": "eq", "value": "lost"}})
        assert_problem(bad, 422, "filter.value")

    async def test_erasure_deletes_carts_and_export_lists_them(self, client: httpx.AsyncClient) -> None:
        contact, cart_id = await make_contact(client), ext()
        await put(client, cart_id, cart({"id": contact["id"]}))
        exported = (await client.get(f"/v1/contacts/{contact['id']}/export", headers=ADMIN)).json()
        assert [c["external_id"] for c in exported["carts"]] == [cart_id]
        erased = await client.delete(f"/v1/contacts/{contact['id']}", headers=ADMIN)
        assert erased.status_code in (200, 204), erased.text
        assert (await client.get(f"/v1/carts/{cart_id}", headers=INTEGRATION)).status_code == 404
