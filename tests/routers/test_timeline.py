"""A contact's timeline through HTTP."""

from __future__ import annotations

import httpx

from app.security import Role
from tests.auth import bearer
from tests.factories import ADMIN, grant_marketing, make_contact, make_list
from tests.routers.test_contacts import assert_problem
from tests.routers.test_orders import INTEGRATION, order


async def test_every_source_appears_newest_first_and_pages(client: httpx.AsyncClient) -> None:
    contact = await make_contact(client, first_name="Inès")
    cid = contact["id"]
    await client.put("/v1/orders/TL-1", json=order({"id": cid}, days_ago=2), headers=INTEGRATION)
    await client.post("/v1/events", json={"contact": {"id": cid}, "type": "store_visit",
                                          "occurred_at": "2026-11-20T10:00:00Z"}, headers=INTEGRATION)
    await grant_marketing(client, cid)
    newsletter = await make_list(client)
    await client.put(f"/v1/lists/{newsletter['id']}/members/{cid}", headers=ADMIN)
    await client.patch(f"/v1/contacts/{cid}", json={"first_name": "Ines"}, headers=ADMIN)

    entries, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/v1/contacts/{cid}/timeline", params=params, headers=ADMIN)).json()
        entries += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    kinds = {e["kind"] for e in entries}
    assert {"order", "event", "consent", "list_subscribed", "change"} <= kinds
    stamps = [e["at"] for e in entries]
    assert stamps == sorted(stamps, reverse=True)
    assert len({(e["kind"], e["ref"]) for e in entries}) == len(entries)  # no entry twice across pages


async def test_viewer_sees_masked_changes(client: httpx.AsyncClient) -> None:
    contact = await make_contact(client, email="ines.roy@example.com")
    await client.patch(f"/v1/contacts/{contact['id']}", json={"email": "ines.r@example.com"}, headers=ADMIN)
    page = (await client.get(f"/v1/contacts/{contact['id']}/timeline", headers=bearer(Role.VIEWER))).json()
    email_change = next(e for e in page["data"] if e["kind"] == "change" and e["data"]["field"] == "email")
    assert (email_change["data"]["old_value"], email_change["data"]["new_value"]) == ("i***@example.com",) * 2


async def test_forged_cursor_is_422(client: httpx.AsyncClient) -> None:
    contact = await make_contact(client)
    response = await client.get(f"/v1/contacts/{contact['id']}/timeline", params={"cursor": "x"}, headers=ADMIN)
    assert_problem(response, 422, "cursor")
