"""POST /v1/contacts/{contact_id}/merge through HTTP: what moves, what is filled, what is refused."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.security import Role
from app.services.links import Link, LinkCodec, LinkKind
from tests.auth import TEST_SECRET, bearer
from tests.factories import ADMIN, grant_marketing, make_attribute, make_contact, make_list
from tests.routers.test_contacts import assert_problem
from tests.routers.test_orders import order
from tests.routers.test_signup import SHOP, fresh_limits, signup  # noqa: F401 (fresh_limits: a fixture used by name)

INTEGRATION = bearer(Role.INTEGRATION, subject="backoffice")


async def merge(client: httpx.AsyncClient, survivor: str, duplicate: str, headers: dict[str, str] = ADMIN
                ) -> httpx.Response:
    return await client.post(f"/v1/contacts/{survivor}/merge", json={"duplicate_id": duplicate}, headers=headers)


async def subscribe(client: httpx.AsyncClient, list_id: str, contact_id: str) -> None:
    response = await client.put(f"/v1/lists/{list_id}/members/{contact_id}", headers=ADMIN)
    assert response.status_code in (200, 201), response.text


async def member_status(client: httpx.AsyncClient, list_id: str) -> dict[str, str]:
    members = (await client.get(f"/v1/lists/{list_id}/members", headers=ADMIN)).json()["data"]
    return {m["contact_id"]: m["status"] for m in members}


async def outbox(sessions: async_sessionmaker[AsyncSession], contact_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with sessions() as session:
        rows = await session.execute(
            text("SELECT topic, payload FROM outbox_message WHERE contact_id = :c ORDER BY id"), {"c": contact_id})
        return [(r.topic, r.payload) for r in rows]


class TestMerge:
    async def test_everything_moves_to_the_survivor_and_the_duplicate_is_gone(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await make_attribute(client, "shoe_size", "number")
        await make_attribute(client, "team", "text")
        survivor = await make_contact(client, email="claire@example.com", tags=["vip"],
                                      attributes={"team": "blue"})
        duplicate = await make_contact(
            client, email="claire.martin@example.com", external_id="SHOP-42", phone="06 12 34 56 78",
            first_name="Claire", last_name="Martin", tags=["newsletter", "vip"],
            attributes={"shoe_size": 38, "team": "red"},
            address={"line1": "3 rue Neuve", "postal_code": "69001", "city": "Lyon", "country": "FR"})
        for number in ("A-1", "A-2"):
            assert (await client.put(f"/v1/orders/{number}", json=order({"id": duplicate["id"]}),
                                     headers=INTEGRATION)).status_code == 201
        event = {"contact": {"id": duplicate["id"]}, "type": "page_view", "occurred_at": "2026-11-01T10:00:00Z",
                 "properties": {"url": "/shoes"}}
        assert (await client.post("/v1/events", json=event, headers=INTEGRATION)).status_code == 201
        await grant_marketing(client, duplicate["id"])
        newsletter = await make_list(client)
        await subscribe(client, newsletter["id"], duplicate["id"])

        response = await merge(client, survivor["id"], duplicate["id"])
        assert response.status_code == 200, response.text
        merged = response.json()
        assert response.headers["etag"] == f'"v{merged["version"]}"'
        assert merged["id"] == survivor["id"] and merged["email"] == "claire@example.com"  # its own email stays
        assert (merged["external_id"], merged["phone"], merged["first_name"], merged["last_name"]) == (
            "SHOP-42", "+33612345678", "Claire", "Martin")
        assert merged["address"] == {"line1": "3 rue Neuve", "line2": None, "postal_code": "69001", "city": "Lyon",
                                     "region": None, "country": "FR"}
        assert merged["tags"] == ["vip", "newsletter"]
        assert merged["attributes"] == {"team": "blue", "shoe_size": 38}  # the survivor's values win
        assert merged["stats"]["orders_count"] == 2 and merged["lifecycle_stage"] == "new_customer"

        assert_problem(await client.get(f"/v1/contacts/{duplicate['id']}", headers=ADMIN), 404)
        timeline = (await client.get(f"/v1/contacts/{survivor['id']}/timeline", headers=ADMIN)).json()["data"]
        assert sorted(e["data"]["external_id"] for e in timeline if e["kind"] == "order") == ["A-1", "A-2"]
        assert [e["data"]["type"] for e in timeline if e["kind"] == "event"] == ["page_view"]
        consents = (await client.get(f"/v1/contacts/{survivor['id']}/consents", headers=ADMIN)).json()
        assert len(consents["events"]) == 1 and consents["state"]["email_marketing"]["granted"] is True
        assert await member_status(client, newsletter["id"]) == {survivor["id"]: "subscribed"}

        history = (await client.get(f"/v1/contacts/{survivor['id']}/history", params={"limit": 200},
                                    headers=ADMIN)).json()["data"]
        by_merge = {h["field"]: h for h in history if h["via"] == "merge"}
        assert by_merge["merged_contact"]["new_value"] == duplicate["id"]
        assert (by_merge["merged_contact.email"]["old_value"], by_merge["merged_contact.email"]["new_value"]) == (
            duplicate["email"], None), "what the duplicate was known by stays on the survivor's history"
        masked = (await client.get(f"/v1/contacts/{survivor['id']}/history", params={"limit": 200},
                                   headers=bearer(Role.VIEWER))).json()["data"]
        assert {h["field"]: h["old_value"] for h in masked if h["via"] == "merge"}["merged_contact.email"] \
            != duplicate["email"], "masked for a token without pii:read, as the contact's own email is"
        assert by_merge["external_id"]["new_value"] == "SHOP-42" and by_merge["tags"]["old_value"] == ["vip"]
        assert [h["field"] for h in history].count("created") == 2, "the duplicate's own history moved with it"

        async with sessions() as session:
            recorded = (await session.execute(text(
                "SELECT survivor_id::text, subject FROM contact_merge WHERE merged_id = :d"), {"d": duplicate["id"]}
            )).one()
        assert tuple(recorded) == (survivor["id"], "tester@shop.example")
        assert (await outbox(sessions, duplicate["id"]))[-1] == (
            "contact.merged", {"survivor_id": survivor["id"], "merged_id": duplicate["id"], "address_retired": True})
        topic, payload = (await outbox(sessions, survivor["id"]))[-1]
        assert topic == "contact.updated" and payload["merged_id"] == duplicate["id"]
        assert {"external_id", "phone", "tags", "stats", "lists"} <= set(payload["fields"])

    async def test_email_and_external_id_move_when_the_survivor_has_none(self, client: httpx.AsyncClient) -> None:
        survivor = await make_contact(client, email=None, phone="0611223344")
        duplicate = await make_contact(client, email="zoe@example.com", external_id="Z-1")
        merged = (await merge(client, survivor["id"], duplicate["id"])).json()
        assert (merged["email"], merged["external_id"], merged["phone"]) == ("zoe@example.com", "Z-1", "+33611223344")
        # the key is now the survivor's: an upsert by it finds the survivor
        found = (await client.get("/v1/contacts", params={"email": "zoe@example.com"}, headers=ADMIN)).json()["data"]
        assert [c["id"] for c in found] == [survivor["id"]]

    async def test_the_latest_list_decision_wins(self, client: httpx.AsyncClient) -> None:
        stays_subscribed, left_later = await make_list(client), await make_list(client)
        survivor, duplicate = await make_contact(client), await make_contact(client)
        for contact in (survivor, duplicate):
            await grant_marketing(client, contact["id"])
        # list A: survivor unsubscribed, then the duplicate subscribed → subscribed
        await subscribe(client, stays_subscribed["id"], survivor["id"])
        await client.delete(f"/v1/lists/{stays_subscribed['id']}/members/{survivor['id']}", headers=ADMIN)
        await subscribe(client, stays_subscribed["id"], duplicate["id"])
        # list B: survivor subscribed, then the duplicate unsubscribed → unsubscribed
        await subscribe(client, left_later["id"], survivor["id"])
        await subscribe(client, left_later["id"], duplicate["id"])
        await client.delete(f"/v1/lists/{left_later['id']}/members/{duplicate['id']}", headers=ADMIN)
        assert (await merge(client, survivor["id"], duplicate["id"])).status_code == 200
        assert await member_status(client, stays_subscribed["id"]) == {survivor["id"]: "subscribed"}
        assert await member_status(client, left_later["id"]) == {survivor["id"]: "unsubscribed"}

    @pytest.mark.usefixtures("fresh_limits")
    async def test_an_anonymous_signup_does_not_make_a_merge_forget_that_the_person_left(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        """Attack: the duplicate left the newsletter by its one-click link, after the survivor had subscribed;
        then anyone types the duplicate's address in the public form (pending, unconfirmed). Merging must keep
        the person's latest decision, the unsubscribe, as it does without the form: not the survivor's older
        subscription."""
        newsletter = await make_list(client, public_signup=True, signup_origins=[SHOP], signup_wording="yes")
        survivor, duplicate = await make_contact(client), await make_contact(client)
        for contact in (survivor, duplicate):
            await grant_marketing(client, contact["id"])
            await subscribe(client, newsletter["id"], contact["id"])
        token = LinkCodec(TEST_SECRET).encode(
            Link(LinkKind.UNSUBSCRIBE, uuid.UUID(duplicate["id"]), uuid.UUID(newsletter["id"])))
        assert (await client.post(f"/v1/public/unsubscribe/{token}")).json()["unsubscribed_lists"] == 1
        assert (await signup(client, newsletter["id"], {"email": duplicate["email"], "consent": True})
                ).status_code == 202
        assert (await merge(client, survivor["id"], duplicate["id"])).status_code == 200
        assert await member_status(client, newsletter["id"]) == {survivor["id"]: "unsubscribed"}
        assert ("membership.unsubscribed", {"list_id": newsletter["id"], "contact_id": survivor["id"],
                                            "reason": "merge"}) in await outbox(sessions, survivor["id"])

    async def test_the_ledger_stays_append_only_outside_a_merge(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        a, b = await make_contact(client), await make_contact(client)
        await grant_marketing(client, a["id"])
        async with sessions() as session:
            with pytest.raises(DBAPIError, match="append-only"):
                async with session.begin_nested():
                    await session.execute(text("UPDATE consent_event SET contact_id = :b WHERE contact_id = :a"),
                                          {"a": a["id"], "b": b["id"]})
            with pytest.raises(DBAPIError, match="append-only"):  # the flag names one pair, and only moves
                async with session.begin_nested():
                    await session.execute(text("SELECT set_config('carnet.merging', :p, true)"),
                                          {"p": f"{a['id']}:{b['id']}"})
                    await session.execute(text("UPDATE consent_event SET source = 'forged' WHERE contact_id = :a"),
                                          {"a": a["id"]})


class TestRefusals:
    async def test_merging_a_contact_with_itself_is_422(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        assert_problem(await merge(client, contact["id"], contact["id"]), 422, "duplicate_id")

    async def test_an_already_merged_contact_is_409_naming_its_survivor(self, client: httpx.AsyncClient) -> None:
        a, b, c = await make_contact(client), await make_contact(client), await make_contact(client)
        assert (await merge(client, b["id"], a["id"])).status_code == 200
        body = assert_problem(await merge(client, c["id"], a["id"]), 409)
        assert body["survivor_id"] == b["id"] and body["type"].endswith("/contact-already-merged")
        assert (await merge(client, c["id"], b["id"])).status_code == 200  # merges of merges: follow the chain
        assert assert_problem(await merge(client, a["id"], c["id"]), 409)["survivor_id"] == c["id"]

    async def test_unknown_or_erased_contacts_are_404(self, client: httpx.AsyncClient) -> None:
        a, erased = await make_contact(client), await make_contact(client)
        assert (await client.delete(f"/v1/contacts/{erased['id']}", headers=ADMIN)).status_code == 204
        for survivor, duplicate in ((a["id"], erased["id"]), (erased["id"], a["id"]), (a["id"], str(uuid.uuid4()))):
            assert assert_problem(await merge(client, survivor, duplicate), 404)["type"].endswith("/contact-not-found")
        assert (await client.get(f"/v1/contacts/{a['id']}", headers=ADMIN)).status_code == 200

    async def test_if_match_applies_to_the_survivor(self, client: httpx.AsyncClient) -> None:
        a, b = await make_contact(client), await make_contact(client)
        stale = {**ADMIN, "If-Match": f'"v{a["version"] + 1}"'}
        assert_problem(await merge(client, a["id"], b["id"], headers=stale), 412)
        assert (await client.get(f"/v1/contacts/{b['id']}", headers=ADMIN)).status_code == 200  # nothing happened
        current = {**ADMIN, "If-Match": f'"v{a["version"]}"'}
        assert (await merge(client, a["id"], b["id"], headers=current)).status_code == 200

    async def test_idempotency_key_replays_the_first_response(self, client: httpx.AsyncClient) -> None:
        a, b, c = await make_contact(client), await make_contact(client), await make_contact(client)
        keyed = {**ADMIN, "Idempotency-Key": "merge-1"}
        first = await merge(client, a["id"], b["id"], headers=keyed)
        again = await merge(client, a["id"], b["id"], headers=keyed)
        assert (first.status_code, again.status_code) == (200, 200)
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert_problem(await merge(client, a["id"], c["id"], headers=keyed), 422)

    async def test_bad_bodies_are_422_naming_the_field(self, client: httpx.AsyncClient) -> None:
        a = await make_contact(client)
        url = f"/v1/contacts/{a['id']}/merge"
        assert_problem(await client.post(url, json={}, headers=ADMIN), 422, "duplicate_id")
        assert_problem(await client.post(url, json={"duplicate_id": "nope"}, headers=ADMIN), 422, "duplicate_id")
        assert_problem(await client.post(url, json={"duplicate_id": a["id"], "extra": 1}, headers=ADMIN), 422, "extra")

    async def test_scopes(self, client: httpx.AsyncClient) -> None:
        a, b = await make_contact(client), await make_contact(client)
        assert_problem(await client.post(f"/v1/contacts/{a['id']}/merge", json={"duplicate_id": b["id"]}), 401)
        body = assert_problem(await merge(client, a["id"], b["id"], headers=bearer(Role.VIEWER)), 403)
        assert body["missing_scopes"] == ["contacts:write"]
        assert (await merge(client, a["id"], b["id"], headers=bearer(Role.EDITOR))).status_code == 200
