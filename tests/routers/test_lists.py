"""HTTP contract of /v1/lists and /v1/public: lists, subscriptions, double opt-in, one-click unsubscribe."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.security import Role
from app.services.links import Link, LinkCodec, LinkKind
from app.settings import Settings
from tests.auth import TEST_SECRET, bearer
from tests.factories import ADMIN, PROOF, grant_marketing, make_contact, make_list
from tests.routers.test_contacts import assert_problem

CODEC = LinkCodec(TEST_SECRET)
LIST_MESSAGES = "membership.%"  # contact.created and the like are in the outbox too (tests/sync)
EDITOR = bearer(Role.EDITOR, subject="editor@shop.example")


async def subscribe(client: httpx.AsyncClient, list_id: str, contact_id: str, body: Any = None,
                    headers: dict[str, str] = ADMIN) -> httpx.Response:
    return await client.put(f"/v1/lists/{list_id}/members/{contact_id}", json=body, headers=headers)


async def member_status(client: httpx.AsyncClient, list_id: str, contact_id: str) -> str | None:
    members = (await client.get(f"/v1/lists/{list_id}/members", params={"limit": 1000}, headers=ADMIN)).json()
    return next((m["status"] for m in members["data"] if m["contact_id"] == contact_id), None)


async def ledger(client: httpx.AsyncClient, contact_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/contacts/{contact_id}/consents", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def outbox(sessions: async_sessionmaker[AsyncSession], contact_id: str,
                 topics: str = "%") -> list[tuple[str, dict[str, Any]]]:
    async with sessions() as session:
        rows = await session.execute(
            text("SELECT topic, payload FROM outbox_message WHERE contact_id = :c AND topic LIKE :t ORDER BY id"),
            {"c": contact_id, "t": topics}
        )
        return [(r.topic, r.payload) for r in rows]


def url_path(url: str) -> str:
    return httpx.URL(url).raw_path.decode()


def forge(token: str, **changes: str) -> str:
    """Edit a token's claims and keep its signature (what a tamperer would try)."""
    payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edited = base64.urlsafe_b64encode(json.dumps({**claims, **changes}).encode()).decode().rstrip("=")
    return f"{edited}.{mac}"


class TestListCrud:
    async def test_create_read_patch_delete(self, client: httpx.AsyncClient) -> None:
        created = await client.post("/v1/lists", json={"name": "newsletter", "description": "Monthly news",
                                                       "accepted_kinds": ["customer", "prospect", "customer"]},
                                    headers=ADMIN)
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["name"], body["double_opt_in"], body["accepted_kinds"]) == ("newsletter", False,
                                                                                 ["customer", "prospect"])
        assert body["counts"] == {"subscribed": 0, "pending": 0, "unsubscribed": 0}
        assert created.headers["etag"] == '"v1"' and created.headers["location"] == f"/v1/lists/{body['id']}"
        url = f"/v1/lists/{body['id']}"
        patched = await client.patch(url, json={"accepted_kinds": None, "double_opt_in": True},
                                     headers={**ADMIN, "If-Match": '"v1"'})
        assert patched.status_code == 200, patched.text
        assert (patched.json()["accepted_kinds"], patched.json()["double_opt_in"], patched.json()["version"]) == (
            None, True, 2)
        assert_problem(await client.patch(url, json={"description": "x"}, headers={**ADMIN, "If-Match": '"v1"'}), 412)
        assert (await client.get(url, headers=ADMIN)).headers["etag"] == '"v2"'
        assert (await client.delete(url, headers=ADMIN)).status_code == 204
        assert_problem(await client.get(url, headers=ADMIN), 404)

    async def test_duplicate_name_is_409_with_existing_id(self, client: httpx.AsyncClient) -> None:
        first = await make_list(client, name="vip-offers")
        assert assert_problem(await client.post("/v1/lists", json={"name": "vip-offers"}, headers=ADMIN),
                              409)["existing_id"] == first["id"]
        other = await make_list(client, name="other")
        renamed = await client.patch(f"/v1/lists/{other['id']}", json={"name": "vip-offers"}, headers=ADMIN)
        assert assert_problem(renamed, 409)["existing_id"] == first["id"]

    @pytest.mark.parametrize(("body", "field"), [
        ({}, "name"),
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": "x", "accepted_kinds": ["alien"]}, "accepted_kinds.0"),
        ({"name": "x", "accepted_kinds": []}, "accepted_kinds"),
        ({"name": ""}, "name"),
    ])
    async def test_bad_input_is_422_naming_the_field(self, client: httpx.AsyncClient, body: dict, field: str) -> None:
        assert_problem(await client.post("/v1/lists", json=body, headers=ADMIN), 422, field)

    async def test_patch_cannot_null_the_name(self, client: httpx.AsyncClient) -> None:
        made = await make_list(client)
        assert_problem(await client.patch(f"/v1/lists/{made['id']}", json={"name": None}, headers=ADMIN), 422, "name")
        # every faulty field at once, each named (docs/api.md, Errors), not one `body` error for the first
        both = await client.patch(f"/v1/lists/{made['id']}", json={"name": None, "double_opt_in": None}, headers=ADMIN)
        assert_problem(both, 422, "name", "double_opt_in")

    async def test_pages_by_name(self, client: httpx.AsyncClient) -> None:
        names = [f"page-{i}" for i in range(5)]
        for name in reversed(names):
            await make_list(client, name=name)
        seen: list[str] = []
        cursor = None
        for _ in range(5):
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/v1/lists", params=params, headers=ADMIN)).json()
            seen += [item["name"] for item in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == names

    async def test_forged_cursor_and_big_limit_are_422(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get("/v1/lists", params={"cursor": "garbage"}, headers=ADMIN), 422, "cursor")
        assert_problem(await client.get("/v1/lists", params={"limit": 1001}, headers=ADMIN), 422, "limit")

    async def test_deleting_a_list_keeps_the_ledger(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        assert (await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})).status_code == 201
        assert (await client.delete(f"/v1/lists/{made['id']}", headers=ADMIN)).status_code == 204
        assert [e["action"] for e in (await ledger(client, contact["id"]))["events"]] == ["granted"]


class TestAuthorization:
    async def test_no_token_is_401(self, client: httpx.AsyncClient) -> None:
        made = await make_list(client)
        for method, url in [("GET", "/v1/lists"), ("POST", "/v1/lists"), ("GET", f"/v1/lists/{made['id']}/members"),
                            ("PUT", f"/v1/lists/{made['id']}/members/{uuid.uuid4()}")]:
            response = await client.request(method, url, json={})
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")

    async def test_viewer_reads_but_cannot_write(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        viewer = bearer(Role.VIEWER)
        assert (await client.get(f"/v1/lists/{made['id']}", headers=viewer)).status_code == 200
        denied = await client.post("/v1/lists", json={"name": "nope"}, headers=viewer)
        assert assert_problem(denied, 403)["missing_scopes"] == ["lists:write"]
        denied = await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}}, headers=viewer)
        assert assert_problem(denied, 403)["missing_scopes"] == ["memberships:write"]
        assert (await ledger(client, contact["id"]))["events"] == []

    async def test_editor_manages_memberships_not_lists(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        assert (await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}},
                                headers=EDITOR)).status_code == 201
        assert_problem(await client.delete(f"/v1/lists/{made['id']}", headers=EDITOR), 403)
        events = (await ledger(client, contact["id"]))["events"]
        assert [(e["action"], e["recorded_by"]) for e in events] == [("granted", "editor@shop.example")]


class TestSubscribe:
    async def test_consent_in_the_body_is_recorded_and_subscribes(self, client: httpx.AsyncClient,
                                                                  sessions: async_sessionmaker[AsyncSession]) -> None:
        made, contact = await make_list(client), await make_contact(client)
        body = {"source": "newsletter_form",
                "consent": {"occurred_at": "2026-11-01T10:00:00Z", "source": "footer_form", "proof": PROOF}}
        response = await subscribe(client, made["id"], contact["id"], body)
        assert response.status_code == 201, response.text
        member = response.json()
        assert (member["status"], member["source"], member["unsubscribed_at"], member["pending_since"]) == (
            "subscribed", "newsletter_form", None, None)
        events = (await ledger(client, contact["id"]))["events"]
        assert len(events) == 1
        assert {k: events[0][k] for k in ("purpose", "action", "source", "occurred_at", "recorded_by", "proof")} == {
            "purpose": "email_marketing", "action": "granted", "source": "footer_form",
            "occurred_at": "2026-11-01T10:00:00Z", "recorded_by": "tester@shop.example", "proof": PROOF}
        assert [t for t, _ in await outbox(sessions, contact["id"], LIST_MESSAGES)] == ["membership.subscribed"]
        again = await subscribe(client, made["id"], contact["id"])
        assert again.status_code == 200 and again.json()["subscribed_at"] == member["subscribed_at"]
        counts = (await client.get(f"/v1/lists/{made['id']}", headers=ADMIN)).json()["counts"]
        assert counts == {"subscribed": 1, "pending": 0, "unsubscribed": 0}

    async def test_a_grant_on_the_ledger_is_enough(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await grant_marketing(client, contact["id"])
        response = await subscribe(client, made["id"], contact["id"])
        assert (response.status_code, response.json()["status"], response.json()["source"]) == (201, "subscribed",
                                                                                                "api")

    async def test_without_any_consent_is_422_consent_required(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        body = assert_problem(await subscribe(client, made["id"], contact["id"]), 422, "consent")
        assert body["errors"][0]["code"] == "consent_required"
        assert await member_status(client, made["id"], contact["id"]) is None

    async def test_contact_kind_outside_accepted_kinds_is_422(self, client: httpx.AsyncClient) -> None:
        vendors_only = await make_list(client, accepted_kinds=["vendor"])
        customer = await make_contact(client, kind="customer")
        response = await subscribe(client, vendors_only["id"], customer["id"], {"consent": {"proof": PROOF}})
        assert assert_problem(response, 422, "contact.kind")["errors"][0]["code"] == "kind_not_accepted"
        assert (await ledger(client, customer["id"]))["events"] == []  # refused whole: no grant recorded
        vendor = await make_contact(client, kind="vendor")
        accepted = await subscribe(client, vendors_only["id"], vendor["id"], {"consent": {"proof": PROOF}})
        assert accepted.status_code == 201

    async def test_contact_without_a_mailable_email_is_422(self, client: httpx.AsyncClient,
                                                           sessions: async_sessionmaker[AsyncSession]) -> None:
        made = await make_list(client)
        phone_only = await make_contact(client, email=None, phone="+33612345699")
        response = await subscribe(client, made["id"], phone_only["id"], {"consent": {"proof": PROOF}})
        assert assert_problem(response, 422, "contact.email")["errors"][0]["code"] == "email_missing"
        bounced = await make_contact(client)
        async with sessions() as session, session.begin():
            await session.execute(text("UPDATE contact SET email_status = 'bounced' WHERE id = :c"),
                                  {"c": bounced["id"]})
        response = await subscribe(client, made["id"], bounced["id"], {"consent": {"proof": PROOF}})
        assert assert_problem(response, 422, "contact.email")["errors"][0]["code"] == "email_undeliverable"
        can = (await client.get(f"/v1/contacts/{bounced['id']}/can-email", headers=ADMIN)).json()
        assert can == {"marketing": False, "transactional": False}

    async def test_unknown_list_contact_and_bad_body(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        assert_problem(await subscribe(client, str(uuid.uuid4()), contact["id"]), 404)
        assert_problem(await subscribe(client, made["id"], str(uuid.uuid4())), 404)
        assert_problem(await subscribe(client, made["id"], contact["id"], {"consent": {}}), 422, "consent.proof")
        assert_problem(await subscribe(client, made["id"], contact["id"], {"consent": {"proof": {}}}), 422,
                       "consent.proof")
        future = {"consent": {"occurred_at": "2999-01-01T00:00:00Z", "proof": PROOF}}
        assert_problem(await subscribe(client, made["id"], contact["id"], future), 422, "consent.occurred_at")
        naive = {"consent": {"occurred_at": "2026-01-01T00:00:00", "proof": PROOF}}
        assert_problem(await subscribe(client, made["id"], contact["id"], naive), 422, "consent.occurred_at")
        assert_problem(await subscribe(client, made["id"], contact["id"], {"sauce": "x"}), 422, "sauce")


class TestUnsubscribe:
    async def test_one_list_only_and_transactional_still_allowed(self, client: httpx.AsyncClient,
                                                                 sessions: async_sessionmaker[AsyncSession]) -> None:
        list_a, list_b, contact = await make_list(client), await make_list(client), await make_contact(client)
        await grant_marketing(client, contact["id"])
        for made in (list_a, list_b):
            assert (await subscribe(client, made["id"], contact["id"])).status_code == 201
        response = await client.delete(f"/v1/lists/{list_a['id']}/members/{contact['id']}", headers=EDITOR)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "unsubscribed" and response.json()["unsubscribed_at"] is not None
        assert await member_status(client, list_a["id"], contact["id"]) == "unsubscribed"
        assert await member_status(client, list_b["id"], contact["id"]) == "subscribed"
        can = (await client.get(f"/v1/contacts/{contact['id']}/can-email", headers=ADMIN)).json()
        assert can == {"marketing": True, "transactional": True}
        state = (await ledger(client, contact["id"]))["state"]["email_marketing"]
        assert state["granted"] is True  # leaving one list is not a withdrawal
        topics = [(t, p.get("list_id")) for t, p in await outbox(sessions, contact["id"], LIST_MESSAGES)]
        assert topics[-1] == ("membership.unsubscribed", list_a["id"])
        again = await client.delete(f"/v1/lists/{list_a['id']}/members/{contact['id']}", headers=ADMIN)
        assert again.json()["unsubscribed_at"] == response.json()["unsubscribed_at"]  # idempotent

    async def test_last_list_gone_means_no_marketing_but_transactional(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        await client.delete(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN)
        can = (await client.get(f"/v1/contacts/{contact['id']}/can-email", headers=ADMIN)).json()
        assert can == {"marketing": False, "transactional": True}

    async def test_non_member_is_404(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        body = assert_problem(await client.delete(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN),
                              404)
        assert body["type"].endswith("/membership-not-found")


class TestResubscribe:
    async def test_needs_a_consent_dated_after_the_unsubscribe(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await grant_marketing(client, contact["id"], occurred_at="2026-01-01T00:00:00Z")
        await subscribe(client, made["id"], contact["id"])
        left = (await client.delete(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN)).json()
        refused = assert_problem(await subscribe(client, made["id"], contact["id"]), 422, "consent")
        assert refused["errors"][0]["code"] == "consent_required"
        assert refused["unsubscribed_at"] == left["unsubscribed_at"]
        older = {"consent": {"occurred_at": "2026-06-01T00:00:00Z", "proof": PROOF}}
        assert_problem(await subscribe(client, made["id"], contact["id"], older), 422, "consent")
        assert len((await ledger(client, contact["id"]))["events"]) == 1  # the refused proof was not kept
        accepted = await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        assert (accepted.status_code, accepted.json()["status"], accepted.json()["unsubscribed_at"]) == (
            200, "subscribed", None)
        assert len((await ledger(client, contact["id"]))["events"]) == 2

    async def test_a_grant_recorded_on_the_ledger_after_the_unsubscribe_also_works(
        self, client: httpx.AsyncClient
    ) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        await client.delete(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN)
        await grant_marketing(client, contact["id"])
        assert (await subscribe(client, made["id"], contact["id"])).json()["status"] == "subscribed"


class TestDoubleOptIn:
    async def test_pending_then_confirmed_by_the_emailed_link(self, client: httpx.AsyncClient,
                                                              sessions: async_sessionmaker[AsyncSession]) -> None:
        made, contact = await make_list(client, name="doi-news", double_opt_in=True), await make_contact(client)
        response = await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        assert response.status_code == 201, response.text
        assert (response.json()["status"], response.json()["subscribed_at"]) == ("pending", None)
        assert response.json()["pending_since"] is not None
        messages = await outbox(sessions, contact["id"], LIST_MESSAGES)
        assert [t for t, _ in messages] == ["membership.confirmation_requested"]
        payload = messages[0][1]
        assert (payload["list_id"], payload["contact_id"], payload["list_name"]) == (made["id"], contact["id"],
                                                                                     "doi-news")
        public = Settings().public_base_url  # PUBLIC_BASE_URL, not the API request's Host (http://test here)
        assert payload["confirm_url"].startswith(f"{public}/v1/public/confirm/")
        assert payload["unsubscribe_url"].startswith(f"{public}/v1/public/unsubscribe/")
        link = CODEC.decode(payload["confirm_url"].rsplit("/", 1)[1], kind=LinkKind.CONFIRM)
        assert (str(link.contact_id), str(link.list_id)) == (contact["id"], made["id"])
        assert link.expires_at == int(datetime.fromisoformat(payload["confirm_expires_at"]).timestamp())
        assert 7 * 86400 - 60 < link.expires_at - time.time() <= 7 * 86400  # valid for seven days
        counts = (await client.get(f"/v1/lists/{made['id']}", headers=ADMIN)).json()["counts"]
        assert counts == {"subscribed": 0, "pending": 1, "unsubscribed": 0}
        can = (await client.get(f"/v1/contacts/{contact['id']}/can-email", headers=ADMIN)).json()
        assert can["marketing"] is False  # pending is not subscribed

        preview = await client.get(url_path(payload["confirm_url"]), headers={"User-Agent": "MailScanner/1.0"})
        assert preview.status_code == 200, preview.text  # a scanner opening the link confirms nothing
        assert preview.json() == {"list": {"id": made["id"], "name": "doi-news"}, "status": "pending",
                                  "confirm_url": "http://test" + url_path(payload["confirm_url"])}
        assert await member_status(client, made["id"], contact["id"]) == "pending"
        assert len((await ledger(client, contact["id"]))["events"]) == 1
        confirmed = await client.post(url_path(payload["confirm_url"]), headers={"User-Agent": "MailApp/2.1"})
        assert confirmed.status_code == 200, confirmed.text
        assert confirmed.json() == {"result": "confirmed", "list": {"id": made["id"], "name": "doi-news"},
                                    "status": "subscribed"}
        assert await member_status(client, made["id"], contact["id"]) == "subscribed"
        events = (await ledger(client, contact["id"]))["events"]
        assert [(e["action"], e["recorded_by"], e["source"], e["list_id"]) for e in events] == [
            ("granted", "tester@shop.example", None, None), ("confirmed", "link:confirm", "double_opt_in", made["id"])]
        assert events[1]["proof"] == {"ip": "127.0.0.1", "user_agent": "MailApp/2.1", "form_url": None,
                                      "wording": None, "policy_version": None}
        assert [t for t, _ in await outbox(sessions, contact["id"], LIST_MESSAGES)][-1] == "membership.subscribed"

        replay = await client.post(url_path(payload["confirm_url"]))
        assert replay.status_code == 200 and replay.json()["result"] == "already_confirmed"
        assert len((await ledger(client, contact["id"]))["events"]) == 2

    async def test_tampered_and_expired_links_are_refused(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client, double_opt_in=True), await make_contact(client)
        other = await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        await subscribe(client, made["id"], other["id"], {"consent": {"proof": PROOF}})
        genuine = CODEC.encode(Link(LinkKind.CONFIRM, uuid.UUID(contact["id"]), uuid.UUID(made["id"]),
                                    int(time.time()) + 3600))
        unsubscribe_token = CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uuid.UUID(contact["id"]), uuid.UUID(made["id"])))
        refusals = set()
        for token in (forge(genuine, c=other["id"]), genuine[:-2], "garbage", "a.b", genuine + "x" * 600,
                      unsubscribe_token):
            for method in (client.get, client.post):
                body = assert_problem(await method(f"/v1/public/confirm/{token}"), 404)  # names no link
                refusals.add((body["type"], body["title"], body["detail"]))
        # Forged, damaged or genuine but of another kind: one answer, which never says what was wrong.
        assert len(refusals) == 1 and refusals.pop()[0].endswith("/invalid-link")
        expired = CODEC.encode(Link(LinkKind.CONFIRM, uuid.UUID(contact["id"]), uuid.UUID(made["id"]),
                                    int(time.time()) - 1))
        assert assert_problem(await client.post(f"/v1/public/confirm/{expired}"), 410)["type"].endswith(
            "/link-expired")
        forged_expired = forge(expired, c=other["id"])  # only a genuine link is told to be expired
        assert_problem(await client.post(f"/v1/public/confirm/{forged_expired}"), 404)
        for who in (contact, other):
            assert await member_status(client, made["id"], who["id"]) == "pending"
            assert [e["action"] for e in (await ledger(client, who["id"]))["events"]] == ["granted"]

    async def test_a_browser_gets_a_page(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client, name="<b>news</b>", double_opt_in=True), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        token = CODEC.encode(Link(LinkKind.CONFIRM, uuid.UUID(contact["id"]), uuid.UUID(made["id"]),
                                  int(time.time()) + 60))
        browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        page = await client.get(f"/v1/public/confirm/{token}", headers=browser)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "&lt;b&gt;news&lt;/b&gt;" in page.text and "<b>news</b>" not in page.text
        broken = await client.get("/v1/public/confirm/garbage", headers=browser)
        assert broken.status_code == 404 and broken.headers["content-type"].startswith("text/html")

    async def test_unsubscribed_while_pending_cancels_the_confirmation(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client, double_opt_in=True), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        await client.delete(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN)
        token = CODEC.encode(Link(LinkKind.CONFIRM, uuid.UUID(contact["id"]), uuid.UUID(made["id"]),
                                  int(time.time()) + 60))
        assert_problem(await client.post(f"/v1/public/confirm/{token}"), 410)
        assert await member_status(client, made["id"], contact["id"]) == "unsubscribed"

    async def test_asking_again_while_pending_sends_a_new_link(self, client: httpx.AsyncClient,
                                                               sessions: async_sessionmaker[AsyncSession]) -> None:
        made, contact = await make_list(client, double_opt_in=True), await make_contact(client)
        first = (await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})).json()
        again = await subscribe(client, made["id"], contact["id"])
        assert (again.status_code, again.json()["pending_since"]) == (200, first["pending_since"])
        assert [t for t, _ in await outbox(sessions, contact["id"], LIST_MESSAGES)] == ["membership.confirmation_requested"] * 2


class TestOneClickUnsubscribe:
    async def _two_lists(self, client: httpx.AsyncClient) -> tuple[dict, dict, dict]:
        list_a, list_b = await make_list(client, name="alpha"), await make_list(client, name="beta")
        contact = await make_contact(client)
        await grant_marketing(client, contact["id"])
        for made in (list_a, list_b):
            await subscribe(client, made["id"], contact["id"])
        return list_a, list_b, contact

    async def test_get_changes_nothing_and_post_unsubscribes_that_list(self, client: httpx.AsyncClient) -> None:
        list_a, list_b, contact = await self._two_lists(client)
        token = CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uuid.UUID(contact["id"]), uuid.UUID(list_a["id"])))
        preview = await client.get(f"/v1/public/unsubscribe/{token}")
        assert preview.status_code == 200, preview.text
        assert preview.json() == {"list": {"id": list_a["id"], "name": "alpha"}, "status": "subscribed",
                                  "unsubscribe_url": f"http://test/v1/public/unsubscribe/{token}",
                                  "unsubscribe_all_url": f"http://test/v1/public/unsubscribe/{token}?all=1"}
        assert await member_status(client, list_a["id"], contact["id"]) == "subscribed"
        done = await client.post(f"/v1/public/unsubscribe/{token}", content=b"List-Unsubscribe=One-Click",
                                 headers={"content-type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200, done.text
        assert done.json() == {"result": "unsubscribed", "list": {"id": list_a["id"], "name": "alpha"},
                               "status": "unsubscribed", "unsubscribed_lists": 1}
        assert await member_status(client, list_a["id"], contact["id"]) == "unsubscribed"
        assert await member_status(client, list_b["id"], contact["id"]) == "subscribed"
        book = await ledger(client, contact["id"])  # leaving one list is on the ledger, scoped to that list
        assert [(e["purpose"], e["action"], e["list_id"]) for e in book["events"]] == [
            ("email_marketing", "granted", None), ("list_subscription", "withdrawn", list_a["id"])]
        assert book["events"][1]["proof"]["ip"] == "127.0.0.1"
        assert book["state"]["email_marketing"]["granted"] is True  # no purpose changed
        replay = await client.post(f"/v1/public/unsubscribe/{token}")
        assert replay.status_code == 200 and replay.json()["unsubscribed_lists"] == 0
        assert len((await ledger(client, contact["id"]))["events"]) == 2  # a replay stacks nothing

    async def test_all_withdraws_email_marketing(self, client: httpx.AsyncClient) -> None:
        list_a, list_b, contact = await self._two_lists(client)
        token = CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uuid.UUID(contact["id"]), uuid.UUID(list_a["id"])))
        done = await client.post(f"/v1/public/unsubscribe/{token}", params={"all": "1"},
                                 headers={"User-Agent": "Gmail"})
        assert done.status_code == 200 and done.json()["unsubscribed_lists"] == 2
        for made in (list_a, list_b):
            assert await member_status(client, made["id"], contact["id"]) == "unsubscribed"
        book = await ledger(client, contact["id"])
        last = book["events"][-1]
        assert (last["action"], last["source"], last["recorded_by"], last["proof"]["user_agent"]) == (
            "withdrawn", "one_click_unsubscribe", "link:unsubscribe", "Gmail")
        assert book["state"]["email_marketing"] == {"granted": False, "since": last["occurred_at"]}
        again = await client.post(f"/v1/public/unsubscribe/{token}", params={"all": "1"})
        assert again.json()["unsubscribed_lists"] == 0
        assert len((await ledger(client, contact["id"]))["events"]) == 2  # a replay stacks nothing

    async def test_browser_preview_offers_both_choices(self, client: httpx.AsyncClient) -> None:
        list_a, _, contact = await self._two_lists(client)
        token = CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uuid.UUID(contact["id"]), uuid.UUID(list_a["id"])))
        page = await client.get(f"/v1/public/unsubscribe/{token}", headers={"Accept": "text/html"})
        assert page.headers["content-type"].startswith("text/html")
        assert page.text.count('method="post"') == 2 and "alpha" in page.text
        assert await member_status(client, list_a["id"], contact["id"]) == "subscribed"

    async def test_tampered_link_is_404(self, client: httpx.AsyncClient) -> None:
        list_a, list_b, contact = await self._two_lists(client)
        token = CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uuid.UUID(contact["id"]), uuid.UUID(list_a["id"])))
        tampered = f"/v1/public/unsubscribe/{forge(token, l=list_b['id'])}"
        one_click = {"content": "List-Unsubscribe=One-Click",
                     "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
        assert_problem(await client.post(tampered, **one_click), 404)  # RFC 8058: what a mail client sends
        assert_problem(await client.post(tampered + "?all=1"), 404)
        assert_problem(await client.get("/v1/public/unsubscribe/nope"), 404)
        page = await client.get(tampered, headers={"Accept": "text/html", "Accept-Language": "fr"})
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
        assert "Ce lien est incomplet ou a été modifié" in page.text  # the person's page, as before
        assert await member_status(client, list_b["id"], contact["id"]) == "subscribed"
        assert await member_status(client, list_a["id"], contact["id"]) == "subscribed"
        genuine = await client.post(f"/v1/public/unsubscribe/{token}", **one_click)  # the real link still works
        assert genuine.status_code == 200 and await member_status(client, list_a["id"], contact["id"]) == "unsubscribed"

    async def test_confirmation_email_carries_a_working_unsubscribe_link(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        made, contact = await make_list(client, double_opt_in=True), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        payload = (await outbox(sessions, contact["id"], LIST_MESSAGES))[0][1]
        assert (await client.post(url_path(payload["unsubscribe_url"]))).status_code == 200
        assert await member_status(client, made["id"], contact["id"]) == "unsubscribed"


class TestLinksAfterMerge:
    """Links emailed to a contact that was later merged act on the survivor, which holds its person now."""

    async def _merge(self, client: httpx.AsyncClient, survivor: dict, duplicate: dict) -> None:
        response = await client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                     headers=ADMIN)
        assert response.status_code == 200, response.text

    async def _merged_pair(self, client: httpx.AsyncClient) -> tuple[dict, dict, dict, str]:
        """X on list alpha, Y on list beta; Y's beta link is emailed, then Y is merged into X."""
        alpha, beta = await make_list(client, name="alpha"), await make_list(client, name="beta")
        survivor, duplicate = await make_contact(client), await make_contact(client)
        for contact, made in ((survivor, alpha), (duplicate, beta)):
            await grant_marketing(client, contact["id"])
            assert (await subscribe(client, made["id"], contact["id"])).status_code == 201
        token = CODEC.encode(Link(LinkKind.UNSUBSCRIBE, uuid.UUID(duplicate["id"]), uuid.UUID(beta["id"])))
        await self._merge(client, survivor, duplicate)
        assert await member_status(client, beta["id"], survivor["id"]) == "subscribed"  # moved by the merge
        return alpha, beta, survivor, token

    async def test_preview_and_one_click_act_on_the_survivor(self, client: httpx.AsyncClient) -> None:
        alpha, beta, survivor, token = await self._merged_pair(client)
        preview = await client.get(f"/v1/public/unsubscribe/{token}")
        assert preview.status_code == 200 and preview.json()["status"] == "subscribed"
        done = await client.post(f"/v1/public/unsubscribe/{token}")
        assert done.status_code == 200, done.text
        assert done.json() == {"result": "unsubscribed", "list": {"id": beta["id"], "name": "beta"},
                               "status": "unsubscribed", "unsubscribed_lists": 1}
        assert await member_status(client, beta["id"], survivor["id"]) == "unsubscribed"
        assert await member_status(client, alpha["id"], survivor["id"]) == "subscribed"  # that list only
        assert (await client.get(f"/v1/public/unsubscribe/{token}")).json()["status"] == "unsubscribed"

    async def test_all_withdraws_the_survivors_email_marketing(self, client: httpx.AsyncClient) -> None:
        alpha, beta, survivor, token = await self._merged_pair(client)
        done = await client.post(f"/v1/public/unsubscribe/{token}", params={"all": "1"})
        assert done.status_code == 200 and done.json()["unsubscribed_lists"] == 2
        for made in (alpha, beta):
            assert await member_status(client, made["id"], survivor["id"]) == "unsubscribed"
        book = await ledger(client, survivor["id"])
        assert (book["events"][-1]["action"], book["events"][-1]["recorded_by"]) == ("withdrawn", "link:unsubscribe")
        assert book["state"]["email_marketing"]["granted"] is False
        can = (await client.get(f"/v1/contacts/{survivor['id']}/can-email", headers=ADMIN)).json()
        assert can["marketing"] is False

    async def test_merges_of_merges_are_followed(self, client: httpx.AsyncClient) -> None:
        _, beta, survivor, token = await self._merged_pair(client)
        last = await make_contact(client)
        await self._merge(client, last, survivor)  # X is merged into Z in turn
        assert (await client.get(f"/v1/public/unsubscribe/{token}")).json()["status"] == "subscribed"
        done = await client.post(f"/v1/public/unsubscribe/{token}")
        assert done.json()["unsubscribed_lists"] == 1
        assert await member_status(client, beta["id"], last["id"]) == "unsubscribed"

    async def test_a_pending_confirmation_moved_by_a_merge_can_be_confirmed(self, client: httpx.AsyncClient) -> None:
        made = await make_list(client, name="doi", double_opt_in=True)
        survivor, duplicate = await make_contact(client), await make_contact(client)
        assert (await subscribe(client, made["id"], duplicate["id"], {"consent": {"proof": PROOF}})).status_code == 201
        token = CODEC.encode(Link(LinkKind.CONFIRM, uuid.UUID(duplicate["id"]), uuid.UUID(made["id"]),
                                  int(time.time()) + 3600))
        await self._merge(client, survivor, duplicate)
        confirmed = await client.post(f"/v1/public/confirm/{token}")
        assert confirmed.status_code == 200, confirmed.text
        assert confirmed.json() == {"result": "confirmed", "list": {"id": made["id"], "name": "doi"},
                                    "status": "subscribed"}
        assert await member_status(client, made["id"], survivor["id"]) == "subscribed"
        events = (await ledger(client, survivor["id"]))["events"]
        assert [(e["action"], e["recorded_by"]) for e in events] == [
            ("granted", "tester@shop.example"), ("confirmed", "link:confirm")]
        assert (await client.post(f"/v1/public/confirm/{token}")).json()["result"] == "already_confirmed"

    async def test_an_erased_survivor_leaves_nothing_to_act_on(self, client: httpx.AsyncClient) -> None:
        _, beta, survivor, token = await self._merged_pair(client)
        confirm = CODEC.encode(Link(LinkKind.CONFIRM, uuid.UUID(survivor["id"]), uuid.UUID(beta["id"]),
                                    int(time.time()) + 3600))
        assert (await client.delete(f"/v1/contacts/{survivor['id']}", headers=ADMIN)).status_code in (200, 204)
        assert (await client.get(f"/v1/public/unsubscribe/{token}")).json()["status"] is None
        done = await client.post(f"/v1/public/unsubscribe/{token}", params={"all": "1"})
        assert done.status_code == 200
        assert done.json() == {"result": "unsubscribed", "list": None, "status": None, "unsubscribed_lists": 0}
        assert_problem(await client.post(f"/v1/public/confirm/{confirm}"), 410)


class TestMembers:
    async def test_pages_and_status_filter(self, client: httpx.AsyncClient) -> None:
        made = await make_list(client)
        contacts = [await make_contact(client) for _ in range(5)]
        for contact in contacts:
            await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        await client.delete(f"/v1/lists/{made['id']}/members/{contacts[0]['id']}", headers=ADMIN)
        seen: list[str] = []
        cursor = None
        for _ in range(5):
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await client.get(f"/v1/lists/{made['id']}/members", params=params, headers=ADMIN)).json()
            seen += [m["contact_id"] for m in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(c["id"] for c in contacts)
        subscribed = (await client.get(f"/v1/lists/{made['id']}/members", params={"status": "subscribed"},
                                       headers=ADMIN)).json()
        assert [m["contact_id"] for m in subscribed["data"]] == sorted(c["id"] for c in contacts[1:])
        first = (await client.get(f"/v1/lists/{made['id']}/members", params={"limit": 1}, headers=ADMIN)).json()
        other_filter = await client.get(f"/v1/lists/{made['id']}/members",
                                        params={"status": "pending", "cursor": first["next_cursor"]}, headers=ADMIN)
        assert_problem(other_filter, 422, "cursor")
        assert_problem(await client.get(f"/v1/lists/{made['id']}/members", params={"status": "gone"}, headers=ADMIN),
                       422, "status")
        assert_problem(await client.get(f"/v1/lists/{uuid.uuid4()}/members", headers=ADMIN), 404)
        counts = (await client.get(f"/v1/lists/{made['id']}", headers=ADMIN)).json()["counts"]
        assert counts == {"subscribed": 4, "pending": 0, "unsubscribed": 1}


class TestBatch:
    async def test_each_item_stands_alone(self, client: httpx.AsyncClient) -> None:
        made = await make_list(client)
        consenting, silent, member = [await make_contact(client) for _ in range(3)]
        await grant_marketing(client, consenting["id"])
        await subscribe(client, made["id"], member["id"], {"consent": {"proof": PROOF}})
        ghost = str(uuid.uuid4())
        body = {"add": [consenting["id"], silent["id"], ghost], "remove": [member["id"]], "source": "import"}
        response = await client.post(f"/v1/lists/{made['id']}/members/batch", json=body, headers=EDITOR)
        assert response.status_code == 200, response.text
        result = response.json()
        assert [(r["index"], r["op"], r["contact_id"], r["status"]) for r in result["results"]] == [
            (0, "add", consenting["id"], "subscribed"), (1, "add", silent["id"], "error"),
            (2, "add", ghost, "error"), (3, "remove", member["id"], "unsubscribed")]
        assert result["results"][1]["error"]["errors"][0]["code"] == "consent_required"
        assert result["results"][2]["error"]["status"] == 404
        assert (result["succeeded"], result["errors"]) == (2, 2)
        members = (await client.get(f"/v1/lists/{made['id']}/members", headers=ADMIN)).json()["data"]
        assert {(m["contact_id"], m["status"], m["source"]) for m in members} == {
            (consenting["id"], "subscribed", "import"), (member["id"], "unsubscribed", "api")}

    async def test_limits(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        url = f"/v1/lists/{made['id']}/members/batch"
        assert_problem(await client.post(url, json={}, headers=ADMIN), 422)
        too_many = {"add": [str(uuid.uuid4()) for _ in range(1001)]}
        assert_problem(await client.post(url, json=too_many, headers=ADMIN), 422)
        both = {"add": [contact["id"]], "remove": [contact["id"]]}
        assert_problem(await client.post(url, json=both, headers=ADMIN), 422)
        assert_problem(await client.post(f"/v1/lists/{uuid.uuid4()}/members/batch", json={"add": [contact["id"]]},
                                         headers=ADMIN), 404)


class TestRaces:
    @pytest.mark.committing
    async def test_concurrent_subscribes_make_one_membership(self, committing_client: httpx.AsyncClient) -> None:
        made, contact = await make_list(committing_client), await make_contact(committing_client)
        await grant_marketing(committing_client, contact["id"])
        responses = await asyncio.gather(*(subscribe(committing_client, made["id"], contact["id"]) for _ in range(8)))
        assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
        assert {r.json()["subscribed_at"] for r in responses} == {next(
            r for r in responses if r.status_code == 201).json()["subscribed_at"]}

    @pytest.mark.committing
    async def test_withdrawal_racing_subscribes_leaves_nothing_subscribed(
        self, committing_client: httpx.AsyncClient
    ) -> None:
        lists = [await make_list(committing_client) for _ in range(4)]
        contact = await make_contact(committing_client)
        await grant_marketing(committing_client, contact["id"])
        withdraw = committing_client.post(f"/v1/contacts/{contact['id']}/consents", headers=ADMIN,
                                          json={"purpose": "email_marketing", "action": "withdrawn"})
        results = await asyncio.gather(withdraw, *(subscribe(committing_client, m["id"], contact["id"])
                                                   for m in lists))
        assert results[0].status_code == 201
        assert {r.status_code for r in results[1:]} <= {200, 201, 422}
        for made in lists:
            assert await member_status(committing_client, made["id"], contact["id"]) in (None, "unsubscribed")


class TestContactsListFilter:
    async def test_list_filter_returns_subscribed_members_only(self, client: httpx.AsyncClient) -> None:
        newsletter = await make_list(client)
        stays, leaves, never = [await make_contact(client) for _ in range(3)]
        for contact in (stays, leaves):
            await grant_marketing(client, contact["id"])
            assert (await subscribe(client, newsletter["id"], contact["id"])).status_code in (200, 201)
        await client.delete(f"/v1/lists/{newsletter['id']}/members/{leaves['id']}", headers=ADMIN)
        listed = (await client.get("/v1/contacts", params={"list": newsletter["id"]}, headers=ADMIN)).json()["data"]
        assert [c["id"] for c in listed] == [stays["id"]]
        assert never["id"] not in [c["id"] for c in listed]

    async def test_an_unknown_list_is_a_404_not_an_empty_page(self, client: httpx.AsyncClient) -> None:
        """As an unknown segment is, and as the export answers: an empty page would hide a typo in the id."""
        response = await client.get("/v1/contacts", params={"list": str(uuid.uuid4())}, headers=ADMIN)
        assert response.status_code == 404, response.text
        assert response.json()["type"].endswith("/list-not-found")
