"""GET /v1/contacts/duplicates through HTTP: each rule, its reasons, pages, masking and scopes."""

from __future__ import annotations

from typing import Any

import httpx

from app.security import Role, Scope
from tests.auth import bearer
from tests.factories import ADMIN, make_contact
from tests.routers.test_contacts import assert_problem

URL = "/v1/contacts/duplicates"
VIEWER = bearer(Role.VIEWER, subject="viewer@shop.example")


Pairs = list[tuple[set[str], list[str]]]


async def pairs(client: httpx.AsyncClient, headers: dict[str, str] = ADMIN, **params: Any) -> Pairs:
    response = await client.get(URL, params=params, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    for pair in body["data"]:
        assert pair["contacts"][0]["id"] < pair["contacts"][1]["id"]
    return [({c["id"] for c in p["contacts"]}, p["reasons"]) for p in body["data"]]


class TestRules:
    async def test_same_phone_whatever_its_spelling(self, client: httpx.AsyncClient) -> None:
        a = await make_contact(client, phone="06 12 34 56 78")
        b = await make_contact(client, phone="+33 6 12 34 56 78")
        await make_contact(client, phone="06 12 34 56 79")
        assert await pairs(client) == [({a["id"], b["id"]}, ["phone"])]

    async def test_same_name_folded_and_postal_code(self, client: httpx.AsyncClient) -> None:
        a = await make_contact(client, first_name="Jean-Pierre", last_name="Lefèvre", address={"postal_code": "75001"})
        b = await make_contact(client, first_name="JEAN PIERRE", last_name="LEFEVRE", address={"postal_code": "75 001"})
        await make_contact(client, first_name="Jean-Pierre", last_name="Lefèvre", address={"postal_code": "69001"})
        await make_contact(client, last_name="Lefèvre", address={"postal_code": "75001"})  # no first name: no key
        await make_contact(client, first_name="Jean-Pierre", last_name="Lefèvre")  # no postal code: no key
        assert await pairs(client) == [({a["id"], b["id"]}, ["name_postal_code"])]

    async def test_emails_equal_under_provider_rules(self, client: httpx.AsyncClient) -> None:
        gmail_a = await make_contact(client, email="jean.dupont+shop@gmail.com")
        gmail_b = await make_contact(client, email="jeandupont@googlemail.com")
        hotmail_a = await make_contact(client, email="claire+promo@hotmail.fr")
        hotmail_b = await make_contact(client, email="claire@hotmail.fr")
        await make_contact(client, email="claire+promo@orange.fr")  # no rule for this provider
        await make_contact(client, email="claire@orange.fr")
        await make_contact(client, email="claire@outlook.fr")  # another provider is another mailbox
        await make_contact(client, email="c.laire@hotmail.fr")  # dots count outside Gmail
        found = await pairs(client)
        assert sorted(found, key=lambda p: sorted(p[0])) == sorted(
            [({gmail_a["id"], gmail_b["id"]}, ["email"]), ({hotmail_a["id"], hotmail_b["id"]}, ["email"])],
            key=lambda p: sorted(p[0]))

    async def test_a_pair_matched_by_several_rules_is_listed_once_with_every_reason(
        self, client: httpx.AsyncClient
    ) -> None:
        same = {"first_name": "Zoé", "last_name": "Martin", "phone": "0611223344", "address": {"postal_code": "33000"}}
        a = await make_contact(client, email="zoe.martin@gmail.com", **same)
        b = await make_contact(client, email="zoemartin+x@gmail.com", **same)
        assert await pairs(client) == [({a["id"], b["id"]}, ["email", "name_postal_code", "phone"])]
        assert await pairs(client, reason="phone") == [({a["id"], b["id"]}, ["phone"])]

    async def test_three_contacts_sharing_a_phone_are_three_pairs(self, client: httpx.AsyncClient) -> None:
        made = [await make_contact(client, phone="0611223344") for _ in range(3)]
        ids = sorted(c["id"] for c in made)
        assert [sorted(p) for p, _r in await pairs(client)] == [[ids[0], ids[1]], [ids[0], ids[2]], [ids[1], ids[2]]]


class TestPages:
    async def test_keyset_pages_cover_every_pair_once(self, client: httpx.AsyncClient) -> None:
        for phone in ("0611111111", "0622222222", "0633333333"):
            for _ in range(2):
                await make_contact(client, phone=phone)
        everything = await pairs(client)
        first = (await client.get(URL, params={"limit": 2}, headers=ADMIN)).json()
        assert len(first["data"]) == 2 and first["next_cursor"]
        rest = (await client.get(URL, params={"limit": 2, "cursor": first["next_cursor"]}, headers=ADMIN)).json()
        assert len(rest["data"]) == 1 and rest["next_cursor"] is None
        paged = [{c["id"] for c in p["contacts"]} for p in first["data"] + rest["data"]]
        assert paged == [p for p, _r in everything] and len(everything) == 3

    async def test_pages_of_one_cover_every_rule_and_key_once(self, client: httpx.AsyncClient) -> None:
        """Pages stop inside a key, between keys and between rules; a pair two rules match is listed once."""
        for _ in range(4):  # one phone held by four contacts: six pairs, resumed inside the key
            await make_contact(client, phone="0644444444")
        await make_contact(client, phone="0655555555", email="anne.roux@gmail.com")
        await make_contact(client, phone="0655555555", email="anneroux@gmail.com")  # email AND phone
        await make_contact(client, first_name="Léa", last_name="Petit", address={"postal_code": "13001"})
        await make_contact(client, first_name="Lea", last_name="PETIT", address={"postal_code": "13 001"})
        everything = await pairs(client, limit=1000)
        assert len(everything) == 6 + 1 + 1
        assert [r for p, r in everything if len(r) == 2] == [["email", "phone"]]
        paged: Pairs = []
        cursor = None
        for _ in range(20):
            params: dict[str, Any] = {"limit": 1, **({"cursor": cursor} if cursor else {})}
            body = (await client.get(URL, params=params, headers=ADMIN)).json()
            paged += [({c["id"] for c in p["contacts"]}, p["reasons"]) for p in body["data"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert paged == everything
        by_phone = await pairs(client, reason="phone", limit=1000)
        assert len(by_phone) == 7 and all(r == ["phone"] for _p, r in by_phone)

    async def test_a_key_too_long_for_a_cursor_is_read_again_from_the_pair(self, client: httpx.AsyncClient) -> None:
        """A name key of 200 escaped Cyrillic letters would make a cursor longer than the parameter allows (it travels as a digest)."""
        name = {"first_name": "Жанна" * 40, "last_name": "Д", "address": {"postal_code": "75001"}}
        made = [await make_contact(client, **name) for _ in range(3)]
        everything = await pairs(client, limit=1000)
        assert len(everything) == 3
        first = (await client.get(URL, params={"limit": 1}, headers=ADMIN)).json()
        cursor = first["next_cursor"]
        assert cursor and len(cursor) <= 1000
        paged = [{c["id"] for c in p["contacts"]} for p in first["data"]]
        while cursor:
            body = (await client.get(URL, params={"limit": 1, "cursor": cursor}, headers=ADMIN)).json()
            paged += [{c["id"] for c in p["contacts"]} for p in body["data"]]
            cursor = body["next_cursor"]
        assert paged == [p for p, _r in everything]
        # the pair's first contact changed meanwhile: the place is lost, said as such
        cursor = (await client.get(URL, params={"limit": 1}, headers=ADMIN)).json()["next_cursor"]
        first_id = min(c["id"] for c in made)
        patched = await client.patch(f"/v1/contacts/{first_id}", json={"first_name": "Anne"},
                                     headers={**ADMIN, "Content-Type": "application/merge-patch+json"})
        assert patched.status_code == 200, patched.text
        assert_problem(await client.get(URL, params={"limit": 1, "cursor": cursor}, headers=ADMIN), 422, "cursor")

    async def test_bad_cursor_limit_and_reason_are_422(self, client: httpx.AsyncClient) -> None:
        await make_contact(client, phone="0611111111")
        await make_contact(client, phone="0611111111")
        await make_contact(client, phone="0611111111")
        assert_problem(await client.get(URL, params={"cursor": "forged"}, headers=ADMIN), 422, "cursor")
        assert_problem(await client.get(URL, params={"limit": 1001}, headers=ADMIN), 422)
        assert_problem(await client.get(URL, params={"reason": "vibes"}, headers=ADMIN), 422)
        cursor = (await client.get(URL, params={"limit": 1}, headers=ADMIN)).json()["next_cursor"]
        # a cursor issued for all rules is not valid for another selection of rules
        other_rules = {"cursor": cursor, "reason": "email"}
        assert_problem(await client.get(URL, params=other_rules, headers=ADMIN), 422, "cursor")


class TestAccess:
    async def test_needs_pii_read_since_every_rule_compares_masked_values(self, client: httpx.AsyncClient) -> None:
        """A pair tells that two hidden values are equal (docs/security.md, "Class 8"): no masked answer exists."""
        await make_contact(client, email="jean.dupont@gmail.com", last_name="Dupont")
        await make_contact(client, email="jeandupont@gmail.com", last_name="Dupont")
        body = assert_problem(await client.get(URL, headers=VIEWER), 403)
        assert body["missing_scopes"] == ["pii:read"] and "dupont" not in str(body).lower()

    async def test_anonymous_is_401_and_missing_scope_is_403(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get(URL), 401)
        body = assert_problem(await client.get(URL, headers=bearer(Role.MANAGER, scopes={Scope.EXPORTS_READ})), 403)
        assert body["missing_scopes"] == ["contacts:read", "pii:read"]

    async def test_the_path_is_not_taken_for_a_contact_id(self, client: httpx.AsyncClient) -> None:
        response = await client.get(URL, headers=ADMIN)
        assert response.status_code == 200 and response.json() == {"data": [], "next_cursor": None}
