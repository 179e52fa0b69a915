"""HTTP contract of the consent ledger: append-only events, state per purpose, withdrawal, can-email."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.security import Role, Scope
from tests.auth import bearer
from tests.factories import ADMIN, PROOF, grant_marketing, make_contact, make_list
from tests.routers.test_contacts import assert_problem
from tests.routers.test_lists import ledger, member_status, subscribe

PURPOSES = ["email_marketing", "sms_marketing", "phone_marketing", "postal_marketing", "profiling", "partner_sharing"]


async def record(client: httpx.AsyncClient, contact_id: str, headers: dict[str, str] = ADMIN,
                 **body: object) -> httpx.Response:
    return await client.post(f"/v1/contacts/{contact_id}/consents", json=body, headers=headers)


class TestRecordConsent:
    async def test_appends_an_event_with_its_proof(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        integration = bearer(Role.INTEGRATION, subject="backoffice")
        response = await record(client, contact["id"], integration, purpose="sms_marketing", action="granted",
                                source="checkout", occurred_at="2026-03-04T05:06:07+01:00", proof=PROOF)
        assert response.status_code == 201, response.text
        event = response.json()
        assert {k: event[k] for k in ("purpose", "action", "source", "occurred_at", "recorded_by", "proof")} == {
            "purpose": "sms_marketing", "action": "granted", "source": "checkout",
            "occurred_at": "2026-03-04T04:06:07Z", "recorded_by": "backoffice", "proof": PROOF}
        assert isinstance(event["id"], int) and event["recorded_at"].endswith("Z")

    async def test_occurred_at_defaults_to_now(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        event = (await record(client, contact["id"], purpose="profiling", action="withdrawn")).json()
        assert event["occurred_at"] == event["recorded_at"] and event["proof"] is None

    @pytest.mark.parametrize(("body", "field"), [
        ({"purpose": "email_marketing", "action": "granted"}, "proof"),
        ({"purpose": "email_marketing", "action": "granted", "proof": {}}, "proof"),
        ({"purpose": "telepathy", "action": "granted", "proof": PROOF}, "purpose"),
        ({"purpose": "profiling", "action": "maybe"}, "action"),
        ({"purpose": "profiling", "action": "withdrawn", "occurred_at": "2026-01-01T00:00:00"}, "occurred_at"),
        ({"purpose": "profiling", "action": "withdrawn", "occurred_at": "2999-01-01T00:00:00Z"}, "occurred_at"),
        ({"purpose": "profiling", "action": "granted", "proof": {**PROOF, "ip": "not-an-ip"}}, "proof.ip"),
        ({"purpose": "profiling", "action": "granted", "proof": {**PROOF, "signature": "x"}}, "proof.signature"),
        ({"purpose": "profiling", "action": "withdrawn", "note": "typo"}, "note"),
    ])
    async def test_bad_input_is_422_naming_the_field(self, client: httpx.AsyncClient, body: dict, field: str) -> None:
        contact = await make_contact(client)
        assert_problem(await client.post(f"/v1/contacts/{contact['id']}/consents", json=body, headers=ADMIN), 422,
                       field)
        assert (await ledger(client, contact["id"]))["events"] == []

    async def test_unknown_contact_is_404(self, client: httpx.AsyncClient) -> None:
        assert_problem(await record(client, str(uuid.uuid4()), purpose="profiling", action="withdrawn"), 404)
        assert_problem(await client.get(f"/v1/contacts/{uuid.uuid4()}/consents", headers=ADMIN), 404)
        assert_problem(await client.get(f"/v1/contacts/{uuid.uuid4()}/can-email", headers=ADMIN), 404)

    async def test_scopes(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        assert_problem(await client.get(f"/v1/contacts/{contact['id']}/consents"), 401)
        assert_problem(await client.post(f"/v1/contacts/{contact['id']}/consents", json={}), 401)
        denied = await record(client, contact["id"], bearer(Role.VIEWER), purpose="profiling", action="withdrawn")
        assert assert_problem(denied, 403)["missing_scopes"] == ["consents:write"]
        assert (await ledger(client, contact["id"]))["events"] == []
        viewed = await client.get(f"/v1/contacts/{contact['id']}/consents", headers=bearer(Role.VIEWER))
        assert viewed.status_code == 200

    async def test_idempotency_key_replays(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        headers = {**ADMIN, "Idempotency-Key": "consent-1"}
        first = await record(client, contact["id"], headers, purpose="profiling", action="withdrawn")
        again = await record(client, contact["id"], headers, purpose="profiling", action="withdrawn")
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert len((await ledger(client, contact["id"]))["events"]) == 1


class TestLedger:
    async def test_state_per_purpose_follows_when_things_happened(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        cid = contact["id"]
        await grant_marketing(client, cid, occurred_at="2026-01-01T00:00:00Z")
        await grant_marketing(client, cid, occurred_at="2026-02-01T00:00:00Z")  # still granted since January
        await record(client, cid, purpose="profiling", action="withdrawn", occurred_at="2026-03-01T00:00:00Z")
        # recorded last, happened first: it does not change the current state
        await record(client, cid, purpose="profiling", action="granted", occurred_at="2025-12-01T00:00:00Z",
                     proof=PROOF)
        book = await ledger(client, cid)
        assert book["contact_id"] == cid
        assert book["state"] == {
            "email_marketing": {"granted": True, "since": "2026-01-01T00:00:00Z"},
            "profiling": {"granted": False, "since": "2026-03-01T00:00:00Z"},
            **{p: {"granted": False, "since": None} for p in PURPOSES if p not in {"email_marketing", "profiling"}},
        }
        assert [(e["purpose"], e["action"], e["occurred_at"]) for e in book["events"]] == [
            ("profiling", "granted", "2025-12-01T00:00:00Z"),
            ("email_marketing", "granted", "2026-01-01T00:00:00Z"),
            ("email_marketing", "granted", "2026-02-01T00:00:00Z"),
            ("profiling", "withdrawn", "2026-03-01T00:00:00Z"),
        ]

    async def test_viewer_sees_the_proof_masked(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        await grant_marketing(client, contact["id"])
        event = (await client.get(f"/v1/contacts/{contact['id']}/consents",
                                  headers=bearer(Role.VIEWER))).json()["events"][0]
        assert event["proof"] == {**PROOF, "ip": "***", "user_agent": "***", "form_url": "***"}

    async def test_viewer_never_sees_the_form_url(self, client: httpx.AsyncClient) -> None:
        # Audit: a form URL can carry the person (`?email=claire.martin@example.com`), as the ip and user agent do.
        contact = await make_contact(client)
        form_url = "https://shop.example/newsletter?email=claire.martin%40example.com"
        await grant_marketing(client, contact["id"], proof={**PROOF, "form_url": form_url})
        viewer = bearer(Role.VIEWER)
        exporter = bearer(Role.MANAGER, scopes={Scope.EXPORTS_READ})  # no pii:read
        for path, headers in (("consents", viewer), ("timeline", viewer), ("export", exporter)):
            response = await client.get(f"/v1/contacts/{contact['id']}/{path}", headers=headers)
            assert response.status_code == 200, response.text
            assert "claire.martin" not in response.text and PROOF["ip"] not in response.text, path
        export = (await client.get(f"/v1/contacts/{contact['id']}/export", headers=exporter)).json()
        assert export["consents"]["events"][0]["proof"]["form_url"] == "***"
        full = (await client.get(f"/v1/contacts/{contact['id']}/consents", headers=ADMIN)).json()
        assert full["events"][0]["proof"]["form_url"] == form_url

    async def test_the_ledger_cannot_be_edited_or_deleted(self, client: httpx.AsyncClient,
                                                           sessions: async_sessionmaker[AsyncSession]) -> None:
        contact = await make_contact(client)
        event = await grant_marketing(client, contact["id"])
        for statement in ("UPDATE consent_event SET action = 'withdrawn' WHERE id = :id",
                          "DELETE FROM consent_event WHERE id = :id"):
            with pytest.raises(DBAPIError, match="consent_event is append-only"):
                async with sessions() as session, session.begin():
                    await session.execute(text(statement), {"id": event["id"]})
        assert (await ledger(client, contact["id"]))["events"] == [event]

    async def test_no_route_edits_or_deletes_an_event(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        event = await grant_marketing(client, contact["id"])
        url = f"/v1/contacts/{contact['id']}/consents"
        for method in ("PUT", "PATCH", "DELETE"):
            assert (await client.request(method, url, headers=ADMIN)).status_code == 405
            assert (await client.request(method, f"{url}/{event['id']}", headers=ADMIN)).status_code == 404


class TestWithdrawal:
    async def test_withdrawing_email_marketing_unsubscribes_every_list(self, client: httpx.AsyncClient) -> None:
        list_a, list_b, list_c = (await make_list(client), await make_list(client),
                                  await make_list(client, double_opt_in=True))
        contact = await make_contact(client)
        await grant_marketing(client, contact["id"])
        for made in (list_a, list_b, list_c):
            await subscribe(client, made["id"], contact["id"])
        await client.delete(f"/v1/lists/{list_a['id']}/members/{contact['id']}", headers=ADMIN)
        before = await client.get(f"/v1/lists/{list_a['id']}/members", headers=ADMIN)
        left_a = next(m for m in before.json()["data"] if m["contact_id"] == contact["id"])["unsubscribed_at"]
        response = await record(client, contact["id"], purpose="email_marketing", action="withdrawn",
                                source="preference_center")
        assert response.status_code == 201, response.text
        for made in (list_a, list_b, list_c):  # subscribed and pending alike
            assert await member_status(client, made["id"], contact["id"]) == "unsubscribed"
        after = await client.get(f"/v1/lists/{list_a['id']}/members", headers=ADMIN)
        assert after.json()["data"][0]["unsubscribed_at"] == left_a  # already unsubscribed: untouched
        can = (await client.get(f"/v1/contacts/{contact['id']}/can-email", headers=ADMIN)).json()
        assert can == {"marketing": False, "transactional": True}

    async def test_resubscribing_after_a_withdrawal_needs_a_later_grant(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await grant_marketing(client, contact["id"], occurred_at="2026-01-01T00:00:00Z")
        await subscribe(client, made["id"], contact["id"])
        await record(client, contact["id"], purpose="email_marketing", action="withdrawn",
                     occurred_at="2026-05-01T00:00:00Z")
        refused = assert_problem(await subscribe(client, made["id"], contact["id"]), 422, "consent")
        assert (refused["errors"][0]["code"], refused["withdrawn_at"]) == ("consent_required",
                                                                           "2026-05-01T00:00:00Z")
        # a grant that happened before the withdrawal (recorded late) does not lift it
        await grant_marketing(client, contact["id"], occurred_at="2026-04-01T00:00:00Z")
        assert_problem(await subscribe(client, made["id"], contact["id"]), 422, "consent")
        stale = {"consent": {"occurred_at": "2026-04-15T00:00:00Z", "proof": PROOF}}
        assert_problem(await subscribe(client, made["id"], contact["id"], stale), 422, "consent")
        assert len((await ledger(client, contact["id"]))["events"]) == 3
        fresh = await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        assert (fresh.status_code, fresh.json()["status"]) == (200, "subscribed")
        state = (await ledger(client, contact["id"]))["state"]["email_marketing"]
        assert state["granted"] is True

    @pytest.mark.parametrize("history", ["withdrawn", "never_asked"])
    async def test_a_confirmation_without_proof_confirms_a_grant_and_never_stands_for_one(
        self, client: httpx.AsyncClient, history: str
    ) -> None:
        # `confirmed` needs no proof because it confirms a grant that has one (a double opt-in click). Recorded over
        # a withdrawal, or with no grant at all, it made email_marketing granted with nothing to show for it
        # (art. 7(1)), lifted the person's withdrawal (art. 7(3)), and let the back office subscribe them again.
        made, contact = await make_list(client), await make_contact(client)
        if history == "withdrawn":
            await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
            await record(client, contact["id"], purpose="email_marketing", action="withdrawn")
        refused = await record(client, contact["id"], purpose="email_marketing", action="confirmed",
                               source="back_office")
        assert assert_problem(refused, 422, "proof")["errors"][0]["code"] == "nothing_to_confirm"
        assert (await ledger(client, contact["id"]))["state"]["email_marketing"]["granted"] is False
        assert_problem(await subscribe(client, made["id"], contact["id"]), 422, "consent")
        # A grant (with its proof), then its confirmation: as before.
        await grant_marketing(client, contact["id"])
        confirmed = await record(client, contact["id"], purpose="email_marketing", action="confirmed")
        assert confirmed.status_code == 201, confirmed.text

    async def test_withdrawing_another_purpose_leaves_lists_alone(self, client: httpx.AsyncClient) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        await record(client, contact["id"], purpose="sms_marketing", action="withdrawn")
        assert await member_status(client, made["id"], contact["id"]) == "subscribed"

    async def test_a_back_dated_withdrawal_older_than_the_grant_changes_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        await record(client, contact["id"], purpose="email_marketing", action="withdrawn",
                     occurred_at="2020-01-01T00:00:00Z")
        assert await member_status(client, made["id"], contact["id"]) == "subscribed"
        assert (await ledger(client, contact["id"]))["state"]["email_marketing"]["granted"] is True


class TestCanEmail:
    async def test_needs_consent_and_a_subscription(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        url = f"/v1/contacts/{contact['id']}/can-email"
        assert (await client.get(url, headers=ADMIN)).json() == {"marketing": False, "transactional": True}
        await grant_marketing(client, contact["id"])
        assert (await client.get(url, headers=ADMIN)).json() == {"marketing": False, "transactional": True}
        made = await make_list(client)
        await subscribe(client, made["id"], contact["id"])
        assert (await client.get(url, headers=bearer(Role.VIEWER))).json() == {"marketing": True,
                                                                                "transactional": True}

    async def test_no_email_means_nothing(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, email=None, phone="+33612345698")
        can = (await client.get(f"/v1/contacts/{contact['id']}/can-email", headers=ADMIN)).json()
        assert can == {"marketing": False, "transactional": False}

    async def test_a_complaint_stops_marketing_only(self, client: httpx.AsyncClient,
                                                    sessions: async_sessionmaker[AsyncSession]) -> None:
        made, contact = await make_list(client), await make_contact(client)
        await subscribe(client, made["id"], contact["id"], {"consent": {"proof": PROOF}})
        async with sessions() as session, session.begin():
            await session.execute(text("UPDATE contact SET email_status = 'complained' WHERE id = :c"),
                                  {"c": contact["id"]})
        can = (await client.get(f"/v1/contacts/{contact['id']}/can-email", headers=ADMIN)).json()
        assert can == {"marketing": False, "transactional": True}
