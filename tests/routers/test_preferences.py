"""The preference center (/v1/public/preferences/{token}), GET /v1/contacts/{id}/links, the admin's erasure
requests, and the rule that a GET of any public link changes nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.security import Role
from app.services.links import Link, LinkCodec, LinkKind
from app.settings import Settings
from tests.auth import TEST_SECRET, bearer
from tests.factories import ADMIN, PROOF, grant_marketing, make_contact, make_list
from tests.routers.test_contacts import assert_problem
from tests.routers.test_lists import forge, ledger, member_status, subscribe

CODEC = LinkCodec(TEST_SECRET)
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "User-Agent": "Firefox/140"}
AS_JSON = {"Accept": "application/json", "User-Agent": "Firefox/140"}


def prefs_path(contact_id: str) -> str:
    return f"/v1/public/preferences/{CODEC.encode(Link(LinkKind.PREFERENCES, uuid.UUID(contact_id), None))}"


async def person_on_two_lists(client: httpx.AsyncClient) -> tuple[dict, dict, dict, dict]:
    """A contact on two public lists (A, B) and one private list; a third public list they never joined."""
    a = await make_list(client, name=f"a-{uuid.uuid4().hex[:6]}", display_name="Bons plans", public_signup=True,
                        signup_origins=["https://shop.example"], signup_wording="Je veux les bons plans",
                        signup_policy_version="v3")
    b = await make_list(client, name=f"b-{uuid.uuid4().hex[:6]}", public_signup=True,
                        signup_origins=["https://shop.example"], signup_wording="yes")
    private = await make_list(client, name=f"vip-{uuid.uuid4().hex[:6]}")
    contact = await make_contact(client, first_name="Claire")
    await grant_marketing(client, contact["id"])
    for made in (a, b, private):
        assert (await subscribe(client, made["id"], contact["id"])).status_code == 201
    return contact, a, b, private


async def change(client: httpx.AsyncClient, contact_id: str, body: Any, headers: dict[str, str] = AS_JSON,
                 ) -> httpx.Response:
    return await client.post(prefs_path(contact_id), json=body, headers=headers)


class TestLinks:
    async def test_admin_gets_the_signed_preferences_url(self, client: httpx.AsyncClient,
                                                        settings: Settings) -> None:
        contact = await make_contact(client)
        response = await client.get(f"/v1/contacts/{contact['id']}/links", headers=ADMIN)
        assert response.status_code == 200, response.text
        url = response.json()["preferences_url"]
        assert url.startswith(f"{settings.public_base_url}/v1/public/preferences/")
        link = CODEC.decode(url.rsplit("/", 1)[1], kind=LinkKind.PREFERENCES)
        assert (str(link.contact_id), link.list_id, link.expires_at) == (contact["id"], None, None)

    async def test_scopes_and_unknown_contacts(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        url = f"/v1/contacts/{contact['id']}/links"
        assert_problem(await client.get(url), 401)
        assert assert_problem(await client.get(url, headers=bearer(Role.VIEWER)), 403)["missing_scopes"] == [
            "pii:read"]
        assert_problem(await client.get(f"/v1/contacts/{uuid.uuid4()}/links", headers=ADMIN), 404)


class TestView:
    async def test_public_lists_and_the_lists_the_person_is_on(self, client: httpx.AsyncClient) -> None:
        contact, a, b, private = await person_on_two_lists(client)
        other_private = await make_list(client)
        never = await make_list(client, public_signup=True, signup_origins=["https://shop.example"],
                                signup_wording="yes", description="Chaque lundi")
        view = await client.get(prefs_path(contact["id"]), headers=AS_JSON)
        assert view.status_code == 200, view.text
        assert view.headers["cache-control"] == "no-store"
        shown = {item["id"]: (item["name"], item["status"]) for item in view.json()["lists"]}
        assert shown[a["id"]] == ("Bons plans", "subscribed")  # the display name
        assert shown[b["id"]][1] == "subscribed" and shown[private["id"]][1] == "subscribed"
        assert shown[never["id"]][1] is None
        assert other_private["id"] not in shown  # the shop's other lists are not shown
        assert view.json()["email"] == contact["email"]
        assert view.json()["erasure"] == {"mode": "self_service", "request": None}

    async def test_a_browser_gets_an_accessible_page_in_its_language(self, client: httpx.AsyncClient) -> None:
        contact, a, _, _ = await person_on_two_lists(client)
        page = await client.get(prefs_path(contact["id"]), headers={**BROWSER, "Accept-Language": "fr-CA,fr;q=0.9"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<html lang="fr">' in page.text and "Vos préférences e-mail" in page.text
        assert f'<label for="list-{a["id"]}">' in page.text
        for header, value in (("referrer-policy", "no-referrer"), ("x-frame-options", "DENY"),
                              ("cache-control", "no-store")):
            assert page.headers[header] == value
        assert "script-src" not in page.headers["content-security-policy"]
        english = await client.get(prefs_path(contact["id"]), headers={**BROWSER, "Accept-Language": "de,en;q=0.5"})
        assert '<html lang="en">' in english.text

    async def test_links_are_checked(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        token = prefs_path(contact["id"]).rsplit("/", 1)[1]
        other = await make_contact(client)
        assert_problem(await client.get(f"/v1/public/preferences/{forge(token, c=other['id'])}"), 404)
        unsubscribe = CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uuid.UUID(contact["id"]), uuid.uuid4()))
        assert_problem(await client.get(f"/v1/public/preferences/{unsubscribe}"), 404)
        assert_problem(await client.post(f"/v1/public/preferences/{forge(token, c=other['id'])}",
                                         json={"unsubscribe_all": True}), 404)
        assert (await client.get("/v1/public/preferences/garbage", headers=BROWSER)).status_code == 404


class TestChanges:
    async def test_leaving_one_list_leaves_the_others_and_is_on_the_ledger(self, client: httpx.AsyncClient) -> None:
        contact, a, b, private = await person_on_two_lists(client)
        response = await change(client, contact["id"], {"lists": {a["id"]: "unsubscribed", b["id"]: "subscribed"}})
        assert response.status_code == 200, response.text
        assert response.json()["changed"] == 1
        assert await member_status(client, a["id"], contact["id"]) == "unsubscribed"
        assert await member_status(client, b["id"], contact["id"]) == "subscribed"
        assert await member_status(client, private["id"], contact["id"]) == "subscribed"
        book = await ledger(client, contact["id"])
        left = book["events"][-1]
        assert (left["purpose"], left["action"], left["list_id"], left["source"], left["recorded_by"]) == (
            "list_subscription", "withdrawn", a["id"], "preference_center", "link:preferences")
        assert left["proof"]["user_agent"] == "Firefox/140"
        assert left["proof"]["form_url"] == "http://test/v1/public/preferences"  # never the token
        assert book["state"]["email_marketing"]["granted"] is True

    async def test_joining_again_records_a_grant_with_the_lists_wording(self, client: httpx.AsyncClient) -> None:
        contact, a, _, _ = await person_on_two_lists(client)
        await change(client, contact["id"], {"lists": {a["id"]: "unsubscribed"}})
        again = await change(client, contact["id"], {"lists": {a["id"]: "subscribed"}})
        assert again.status_code == 200 and again.json()["changed"] == 1
        assert await member_status(client, a["id"], contact["id"]) == "subscribed"
        granted = (await ledger(client, contact["id"]))["events"][-1]
        assert (granted["purpose"], granted["action"], granted["list_id"], granted["source"]) == (
            "email_marketing", "granted", a["id"], "preference_center")
        assert (granted["proof"]["wording"], granted["proof"]["policy_version"]) == ("Je veux les bons plans", "v3")

    async def test_a_private_list_can_be_left_not_joined(self, client: httpx.AsyncClient) -> None:
        contact, _, _, private = await person_on_two_lists(client)
        hidden = await make_list(client)
        assert_problem(await change(client, contact["id"], {"lists": {hidden["id"]: "subscribed"}}), 422,
                       f"lists.{hidden['id']}")
        assert (await change(client, contact["id"], {"lists": {private["id"]: "unsubscribed"}})).status_code == 200
        refused = await change(client, contact["id"], {"lists": {private["id"]: "subscribed"}})
        assert_problem(refused, 422, f"lists.{private['id']}")

    async def test_a_refused_change_writes_nothing(self, client: httpx.AsyncClient) -> None:
        contact, a, _, _ = await person_on_two_lists(client)
        vendors_only = await make_list(client, public_signup=True, signup_origins=["https://shop.example"],
                                       signup_wording="yes", accepted_kinds=["vendor"])
        before = len((await ledger(client, contact["id"]))["events"])
        refused = await change(client, contact["id"], {"lists": {a["id"]: "unsubscribed",
                                                                 vendors_only["id"]: "subscribed"}})
        assert_problem(refused, 422, f"lists.{vendors_only['id']}")
        assert await member_status(client, a["id"], contact["id"]) == "subscribed"
        assert len((await ledger(client, contact["id"]))["events"]) == before

    async def test_unsubscribe_from_everything(self, client: httpx.AsyncClient) -> None:
        contact, a, b, private = await person_on_two_lists(client)
        done = await change(client, contact["id"], {"unsubscribe_all": True})
        assert done.status_code == 200 and done.json()["changed"] == 3
        for made in (a, b, private):
            assert await member_status(client, made["id"], contact["id"]) == "unsubscribed"
        book = await ledger(client, contact["id"])
        assert (book["events"][-1]["action"], book["events"][-1]["recorded_by"]) == ("withdrawn", "link:preferences")
        assert book["state"]["email_marketing"]["granted"] is False
        can = (await client.get(f"/v1/contacts/{contact['id']}/can-email", headers=ADMIN)).json()
        assert can == {"marketing": False, "transactional": True}  # order emails keep flowing
        assert (await change(client, contact["id"], {"unsubscribe_all": True})).json()["changed"] == 0
        assert len((await ledger(client, contact["id"]))["events"]) == len(book["events"])

    async def test_the_pages_own_form(self, client: httpx.AsyncClient) -> None:
        contact, a, b, _ = await person_on_two_lists(client)
        form = f"action=update&list={a['id']}&list={b['id']}&subscribed={b['id']}"
        page = await client.post(prefs_path(contact["id"]), content=form.encode(),
                                 headers={**BROWSER, "content-type": "application/x-www-form-urlencoded"})
        assert page.status_code == 200 and "Your choices are saved." in page.text
        assert await member_status(client, a["id"], contact["id"]) == "unsubscribed"
        assert await member_status(client, b["id"], contact["id"]) == "subscribed"

    async def test_bounds_and_shapes(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        assert_problem(await change(client, contact["id"], {"export": True, "unsubscribe_all": True}), 422)
        assert_problem(await change(client, contact["id"], {"lists": {}, "x": 1}), 422)
        too_many = {str(uuid.uuid4()): "subscribed" for _ in range(201)}
        assert_problem(await change(client, contact["id"], {"lists": too_many}), 422, "lists")
        big = await client.post(prefs_path(contact["id"]), content=b"action=update&" + b"list=x&" * 5000,
                                headers={"content-type": "application/x-www-form-urlencoded"})
        assert_problem(big, 413)


class TestExport:
    async def test_download_my_data(self, client: httpx.AsyncClient) -> None:
        contact, a, _, _ = await person_on_two_lists(client)
        response = await change(client, contact["id"], {"export": True})
        assert response.status_code == 200, response.text
        assert response.headers["content-disposition"].startswith('attachment; filename="my-data-')
        document = response.json()
        assert document["format"] == "carnet.contact-export/1" and document["pii_masked"] is False
        assert document["profile"]["email"] == contact["email"]
        assert {m["list_id"] for m in document["memberships"]} >= {a["id"]}
        assert document["consents"]["events"][0]["proof"]["ip"] == PROOF["ip"]


class TestErasure:
    async def test_two_steps_then_gone(self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession],
                                       ) -> None:
        contact, _, _, _ = await person_on_two_lists(client)
        first = await change(client, contact["id"], {"erase": "request"})
        assert first.status_code == 200 and first.json()["erasure"] == "confirmation_required"
        assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 200  # not yet
        other = await make_contact(client)
        theirs = (await change(client, other["id"], {"erase": "request"})).json()["confirmation"]
        for wrong in (theirs, "garbage", theirs[:-2]):  # the page exists: the body's field is what is wrong
            refused = assert_problem(await change(client, contact["id"], {"erase_confirmation": wrong}), 422)
            assert refused["type"].endswith("/invalid-confirmation")
            assert refused["errors"][0]["field"] == "erase_confirmation"
        expired = CODEC.encode(Link(LinkKind.ERASE, uuid.UUID(contact["id"]), None, int(time.time()) - 1))
        assert_problem(await change(client, contact["id"], {"erase_confirmation": expired}), 410)
        assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 200
        done = await change(client, contact["id"], {"erase_confirmation": first.json()["confirmation"]})
        assert done.status_code == 200, done.text
        assert (done.json()["erasure"], done.json()["request"]["status"]) == ("completed", "completed")
        assert_problem(await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN), 404)
        assert_problem(await client.get(prefs_path(contact["id"]), headers=AS_JSON), 410)
        async with sessions() as session:
            row = (await session.execute(text("SELECT status, resolved_by FROM erasure_request WHERE contact_id = :c"),
                                         {"c": contact["id"]})).one()
        assert tuple(row) == ("completed", "self_service")

    async def test_in_request_mode_an_admin_answers(self, client: httpx.AsyncClient, app: FastAPI,
                                                    request_mode: None) -> None:
        contact, _, _, _ = await person_on_two_lists(client)
        confirmation = (await change(client, contact["id"], {"erase": "request"})).json()["confirmation"]
        filed = await change(client, contact["id"], {"erase_confirmation": confirmation})
        assert filed.status_code == 202, filed.text
        assert filed.json()["erasure"] == "requested" and filed.json()["request"]["status"] == "open"
        assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 200
        again = (await change(client, contact["id"], {"erase": "request"})).json()["confirmation"]
        assert (await change(client, contact["id"], {"erase_confirmation": again})).json()["request"]["id"] == (
            filed.json()["request"]["id"])  # one open request per person
        view = (await client.get(prefs_path(contact["id"]), headers=AS_JSON)).json()
        assert view["erasure"]["request"]["id"] == filed.json()["request"]["id"]

        queue = await client.get("/v1/erasure-requests", headers=ADMIN)
        assert queue.status_code == 200, queue.text
        mine = [r for r in queue.json()["data"] if r["contact_id"] == contact["id"]]
        assert len(mine) == 1 and mine[0]["contact"]["email"] == contact["email"]
        assert mine[0]["due_by"] > mine[0]["requested_at"]
        assert_problem(await client.get("/v1/erasure-requests", headers=bearer(Role.MANAGER)), 403)
        done = await client.post(f"/v1/erasure-requests/{mine[0]['id']}/complete", headers=ADMIN)
        assert done.status_code == 200, done.text
        assert (done.json()["status"], done.json()["resolved_by"], done.json()["contact"]) == (
            "completed", "tester@shop.example", None)
        assert_problem(await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN), 404)
        assert_problem(await client.post(f"/v1/erasure-requests/{mine[0]['id']}/refuse", json={"note": "x"},
                                         headers=ADMIN), 409)

    async def test_erasing_the_survivor_completes_the_request_filed_by_a_record_merged_into_it(
        self, client: httpx.AsyncClient, request_mode: None
    ) -> None:
        # The person asked from the link of a record the shop then merged into another: erasing the survivor (the
        # person now) by DELETE is an erasure of that person, which completes their open request.
        duplicate, survivor = await make_contact(client), await make_contact(client)
        confirmation = (await change(client, duplicate["id"], {"erase": "request"})).json()["confirmation"]
        request_id = (await change(client, duplicate["id"], {"erase_confirmation": confirmation})).json()[
            "request"]["id"]
        merged = await client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                   headers=ADMIN)
        assert merged.status_code == 200, merged.text
        assert (await client.delete(f"/v1/contacts/{survivor['id']}", headers=ADMIN)).status_code == 204
        request = (await client.get(f"/v1/erasure-requests/{request_id}", headers=ADMIN)).json()
        assert (request["status"], request["resolved_by"]) == ("completed", "tester@shop.example")
        queue = (await client.get("/v1/erasure-requests", headers=ADMIN)).json()["data"]
        assert request_id not in [r["id"] for r in queue]  # nothing left open for someone already erased

    async def test_a_refusal_keeps_the_data_and_says_why(self, client: httpx.AsyncClient, request_mode: None) -> None:
        contact = await make_contact(client)
        confirmation = (await change(client, contact["id"], {"erase": "request"})).json()["confirmation"]
        request_id = (await change(client, contact["id"], {"erase_confirmation": confirmation})).json()["request"]["id"]
        refused = await client.post(f"/v1/erasure-requests/{request_id}/refuse", headers=ADMIN,
                                    json={"note": "Invoices are kept 10 years (Code de commerce L123-22)"})
        assert refused.status_code == 200 and refused.json()["status"] == "refused"
        assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 200
        closed = (await client.get("/v1/erasure-requests", params={"status": "refused"}, headers=ADMIN)).json()
        assert request_id in [r["id"] for r in closed["data"]]


class TestGetChangesNothing:
    async def test_no_public_link_changes_anything_when_followed(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        contact, a, _, _ = await person_on_two_lists(client)
        doi = await make_list(client, double_opt_in=True)
        await subscribe(client, doi["id"], contact["id"])
        uid = uuid.UUID(contact["id"])
        urls = [
            prefs_path(contact["id"]),
            "/v1/public/confirm/"
            + CODEC.encode(Link(LinkKind.CONFIRM, uid, uuid.UUID(doi["id"]), int(time.time()) + 60)),
            f"/v1/public/unsubscribe/{CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uid, uuid.UUID(a['id'])))}",
            f"/v1/public/unsubscribe/{CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uid, uuid.UUID(a['id'])))}?all=1",
        ]
        before = await _snapshot(sessions, contact["id"])
        for url in urls:
            for headers in (BROWSER, AS_JSON, {"Accept": "*/*", "User-Agent": "Barracuda/1.0 (link scanner)"}):
                response = await client.get(url, headers=headers)
                assert response.status_code == 200, (url, response.text)
            assert (await client.head(url)).status_code in (200, 405)
        assert await _snapshot(sessions, contact["id"]) == before


class TestErrorsAreNotKept:
    async def test_every_answer_of_a_link_is_no_store_and_no_referrer_errors_included(
        self, client: httpx.AsyncClient
    ) -> None:
        """docs/api.md "Public links": every answer is `Cache-Control: no-store` and `Referrer-Policy: no-referrer`
        (the URL is the credential). A 404 or 410 is cacheable by default (RFC 9111 4.2.2) and a problem's
        `instance` holds the whole URL, token included: the JSON problems must say so too, not only the pages."""
        contact, a, _, _ = await person_on_two_lists(client)
        uid = uuid.UUID(contact["id"])
        prefs = prefs_path(contact["id"])
        expired = CODEC.encode(Link(LinkKind.CONFIRM, uid, uuid.UUID(a["id"]), int(time.time()) - 60))
        cancelled = CODEC.encode(Link(LinkKind.CONFIRM, uid, uuid.uuid4(), int(time.time()) + 60))
        answers = {
            "invalid-link": await client.get("/v1/public/confirm/garbage.x", headers=AS_JSON),
            "invalid-link (POST)": await client.post("/v1/public/unsubscribe/garbage.x", headers=AS_JSON),
            "link-expired": await client.post(f"/v1/public/confirm/{expired}", headers=AS_JSON),
            "confirmation-cancelled": await client.post(f"/v1/public/confirm/{cancelled}", headers=AS_JSON),
            "invalid-input": await client.post(prefs, json={"lists": {str(uuid.uuid4()): "subscribed"}},
                                               headers=AS_JSON),
            "invalid-confirmation": await client.post(prefs, json={"erase_confirmation": "x.y"}, headers=AS_JSON),
            # FastAPI's own validation of a query parameter, before the route runs
            "malformed ?all=": await client.post("/v1/public/unsubscribe/garbage.x", params={"all": "maybe"},
                                                 headers=AS_JSON),
        }
        assert (await client.delete(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 204
        answers["preferences-gone"] = await client.get(prefs, headers=AS_JSON)
        for name, response in answers.items():
            assert response.status_code in (404, 410, 422), (name, response.text)
            assert response.headers.get("cache-control") == "no-store", (name, dict(response.headers))
            assert response.headers.get("referrer-policy") == "no-referrer", (name, dict(response.headers))


async def _snapshot(sessions: async_sessionmaker[AsyncSession], contact_id: str) -> list[Any]:
    async with sessions() as session:
        return [list(await session.execute(text(sql), {"c": contact_id})) for sql in (
            "SELECT list_id, status, updated_at FROM list_membership WHERE contact_id = :c ORDER BY list_id",
            "SELECT count(*) FROM consent_event WHERE contact_id = :c",
            "SELECT count(*) FROM outbox_message WHERE contact_id = :c",
            "SELECT version, updated_at FROM contact WHERE id = :c",
            "SELECT count(*) FROM erasure_request WHERE contact_id = :c",
        )]


@pytest.fixture
def request_mode(app: FastAPI, settings: Settings) -> Iterator[None]:
    saved = app.state.settings
    app.state.settings = settings.model_copy(update={"preferences_erasure": "request"})
    yield
    app.state.settings = saved



