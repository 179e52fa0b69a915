"""Inbound webhooks from Mailchimp and Brevo, with the vendors' own payload shapes.

Mailchimp posts form-encoded `type=...&data[...]=...` (its audience webhooks); Brevo posts JSON, one event
or a batch. Every case: the right change, a replay changes nothing, a bad secret changes nothing.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.services.inbound import mailchimp_signature
from tests.factories import ADMIN, PROOF, make_contact, make_list
from tests.routers.test_contacts import assert_problem

REMOTE = "a6b5da1054"      # a Mailchimp audience id
BREVO_LIST = 7             # a Brevo list id (an integer, in Brevo's webhooks too)
FIRED = "2026-11-23 10:40:57"


async def setup(client: httpx.AsyncClient, kind: str = "mailchimp", *, double_opt_in: bool = False,
                config: dict[str, Any] | None = None) -> tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]:
    """A mapped list and an unmapped one, a contact subscribed to both, the destination and its secret."""
    mapped = await make_list(client, double_opt_in=double_opt_in)
    other = await make_list(client)
    response = await client.post("/v1/destinations", headers=ADMIN, json={
        "kind": kind, "name": f"{kind}-{uuid.uuid4().hex[:6]}",
        "config": {"api_key": "0123456789abcdef0123-us6", **(config or {})},
        "list_mappings": [{"list_id": mapped["id"], "double_opt_in": double_opt_in,
                           "remote_list_id": REMOTE if kind == "mailchimp" else str(BREVO_LIST)}]})
    assert response.status_code == 201, response.text
    destination = response.json()
    contact = await make_contact(client, email=f"{uuid.uuid4().hex[:10]}@example.com")
    for the_list in (mapped, other):
        response = await client.put(f"/v1/lists/{the_list['id']}/members/{contact['id']}",
                                    json={"consent": {"proof": PROOF}}, headers=ADMIN)
        assert response.status_code == 201, response.text
    return destination, destination["generated_secrets"]["inbound_secret"], contact, {"mapped": mapped,
                                                                                      "other": other}


async def post_mailchimp(client: httpx.AsyncClient, destination: dict[str, Any], secret: str | None,
                         form: dict[str, str], headers: dict[str, str] | None = None) -> httpx.Response:
    url = f"/v1/inbound/mailchimp/{destination['id']}" + (f"?secret={secret}" if secret is not None else "")
    return await client.post(url, content=urlencode(form), headers={
        "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})


async def membership(client: httpx.AsyncClient, list_id: str, contact_id: str) -> str | None:
    members = (await client.get(f"/v1/lists/{list_id}/members", params={"limit": 1000}, headers=ADMIN)).json()
    return next((m["status"] for m in members["data"] if m["contact_id"] == contact_id), None)


async def contact(client: httpx.AsyncClient, contact_id: str) -> dict[str, Any]:
    return (await client.get(f"/v1/contacts/{contact_id}", headers=ADMIN)).json()  # type: ignore[no-any-return]


async def outbox_count(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return await session.scalar(text("SELECT count(*) FROM outbox_message"))  # type: ignore[return-value]


def unsubscribe_form(email: str, reason: str = "manual") -> dict[str, str]:
    return {"type": "unsubscribe", "fired_at": FIRED, "data[action]": "unsub", "data[reason]": reason,
            "data[id]": "8a25ff1d98", "data[list_id]": REMOTE, "data[email]": email, "data[email_type]": "html",
            "data[merges][EMAIL]": email, "data[merges][FNAME]": "Mailchimp", "data[merges][LNAME]": "API",
            "data[merges][INTERESTS]": "Group1,Group2", "data[ip_opt]": "10.20.10.30", "data[campaign_id]": "cb398d21d2"}


async def test_mailchimp_url_check_answers_200(client: httpx.AsyncClient) -> None:
    destination, *_ = await setup(client)
    assert (await client.get(f"/v1/inbound/mailchimp/{destination['id']}")).status_code == 200


async def test_mailchimp_unsubscribe_touches_only_that_list_and_replays_change_nothing(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession],
) -> None:
    destination, secret, person, lists = await setup(client)
    form = unsubscribe_form(person["email"])
    assert (await post_mailchimp(client, destination, "wrong-secret", form)).status_code == 401
    assert (await post_mailchimp(client, destination, None, form)).status_code == 401
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "subscribed"

    response = await post_mailchimp(client, destination, secret, form)
    assert response.status_code == 200 and response.json() == {"received": 1}
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "unsubscribed"
    assert await membership(client, lists["other"]["id"], person["id"]) == "subscribed"
    can = (await client.get(f"/v1/contacts/{person['id']}/can-email", headers=ADMIN)).json()
    assert can == {"marketing": True, "transactional": True}  # still on the other list, order mail unaffected

    before = await outbox_count(sessions)
    replay = await post_mailchimp(client, destination, secret, form)
    assert replay.json() == {"received": 1}  # the same answer: it never says what changed (class 10)
    assert await outbox_count(sessions) == before  # no echo back to the vendor


async def test_mailchimp_cleaned_marks_the_address_bounced(client: httpx.AsyncClient) -> None:
    destination, secret, person, _ = await setup(client)
    form = {"type": "cleaned", "fired_at": FIRED, "data[list_id]": REMOTE, "data[campaign_id]": "4fjk2ma9xd",
            "data[reason]": "hard", "data[email]": person["email"]}
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 1}
    assert (await contact(client, person["id"]))["email_status"] == "bounced"
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 1}
    history = (await client.get(f"/v1/contacts/{person['id']}/history", headers=ADMIN)).json()["data"]
    [change] = [h for h in history if h["field"] == "email_status" and h["via"] == "inbound_sync"]  # replay: none
    assert change["new_value"] == "bounced"


async def test_mailchimp_abuse_withdraws_marketing_once(client: httpx.AsyncClient) -> None:
    destination, secret, person, lists = await setup(client)
    form = unsubscribe_form(person["email"], reason="abuse")
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 2}
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "unsubscribed"
    assert await membership(client, lists["other"]["id"], person["id"]) == "unsubscribed"  # withdrawal: every list
    assert (await contact(client, person["id"]))["email_status"] == "complained"
    await post_mailchimp(client, destination, secret, form)
    ledger = (await client.get(f"/v1/contacts/{person['id']}/consents", headers=ADMIN)).json()
    withdrawals = [e for e in ledger["events"] if e["action"] == "withdrawn"]
    assert len(withdrawals) == 1 and withdrawals[0]["proof"]["vendor"] == "mailchimp"
    assert ledger["state"]["email_marketing"]["granted"] is False


async def test_mailchimp_upemail_changes_the_address(client: httpx.AsyncClient) -> None:
    destination, secret, person, _ = await setup(client)
    new = f"new-{uuid.uuid4().hex[:8]}@example.com"
    form = {"type": "upemail", "fired_at": FIRED, "data[list_id]": REMOTE, "data[new_id]": "51da8c3259",
            "data[new_email]": new, "data[old_email]": person["email"]}
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 1}
    assert (await contact(client, person["id"]))["email"] == new
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 1}
    history = (await client.get(f"/v1/contacts/{person['id']}/history", headers=ADMIN)).json()["data"]
    moves = [h["new_value"] for h in history if h["field"] == "email" and h["via"] == "inbound_sync"]
    assert moves == [new]  # the replay changed nothing


async def test_mailchimp_profile_edits_are_not_taken_back(client: httpx.AsyncClient) -> None:
    destination, secret, person, _ = await setup(client)
    form = {"type": "profile", "fired_at": FIRED, "data[id]": "8a25ff1d98", "data[list_id]": REMOTE,
            "data[email]": person["email"], "data[email_type]": "html", "data[merges][FNAME]": "Changed",
            "data[ip_opt]": "10.20.10.30"}
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 0}
    assert (await contact(client, person["id"]))["first_name"] is None


async def test_mailchimp_signature_when_a_signing_secret_is_set(client: httpx.AsyncClient, app: Any) -> None:
    destination, _, person, lists = await setup(client, config={"signing_secret": "mc-signing-key-123"})
    form = unsubscribe_form(person["email"])
    path = f"/v1/inbound/mailchimp/{destination['id']}"
    url = app.state.settings.public_base_url.rstrip("/") + path
    good = mailchimp_signature("mc-signing-key-123", url, form.items())
    bad = await post_mailchimp(client, destination, None, form, headers={"X-Mailchimp-Signature": good[:-4] + "AAA="})
    assert bad.status_code == 401 and bad.headers["content-type"] == "application/problem+json"
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "subscribed"
    ok = await post_mailchimp(client, destination, None, form, headers={"X-Mailchimp-Signature": good})
    assert ok.status_code == 200 and ok.json() == {"received": 1}
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "unsubscribed"


async def test_vendor_double_opt_in_confirms_the_pending_membership(client: httpx.AsyncClient) -> None:
    mapped = await make_list(client, double_opt_in=True)
    response = await client.post("/v1/destinations", headers=ADMIN, json={
        "kind": "mailchimp", "name": "doi", "config": {"api_key": "0123456789abcdef0123-us6"},
        "list_mappings": [{"list_id": mapped["id"], "remote_list_id": REMOTE, "double_opt_in": True}]})
    destination = response.json()
    person = await make_contact(client)
    response = await client.put(f"/v1/lists/{mapped['id']}/members/{person['id']}",
                                json={"consent": {"proof": PROOF}}, headers=ADMIN)
    assert response.json()["status"] == "pending"
    form = {"type": "subscribe", "fired_at": FIRED, "data[id]": "8a25ff1d98", "data[list_id]": REMOTE,
            "data[email]": person["email"], "data[email_type]": "html", "data[ip_opt]": "10.20.10.30",
            "data[ip_signup]": "10.20.10.30"}
    secret = destination["generated_secrets"]["inbound_secret"]
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 1}
    assert await membership(client, mapped["id"], person["id"]) == "subscribed"
    ledger = (await client.get(f"/v1/contacts/{person['id']}/consents", headers=ADMIN)).json()
    confirmed = [e for e in ledger["events"] if e["action"] == "confirmed"]
    assert len(confirmed) == 1 and confirmed[0]["proof"]["vendor"] == "mailchimp"
    assert confirmed[0]["recorded_by"] == "inbound:mailchimp"
    assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 1}
    ledger = (await client.get(f"/v1/contacts/{person['id']}/consents", headers=ADMIN)).json()
    assert len([e for e in ledger["events"] if e["action"] == "confirmed"]) == 1  # the replay confirmed nothing


async def test_brevo_single_and_batched_events(client: httpx.AsyncClient) -> None:
    destination, secret, person, lists = await setup(client, "brevo")
    url = f"/v1/inbound/brevo/{destination['id']}"
    unsubscribe = {"id": 1, "camp_id": 12, "email": person["email"], "campaign name": "Soldes", "date_sent":
                   "2026-11-20 10:00:00", "date_event": "2026-11-20 10:05:00", "event": "unsubscribe",
                   "list_id": [BREVO_LIST], "tag": "", "ts_sent": 1763632800, "ts_event": 1763633100, "ts": 1763633100}
    assert (await client.post(url, json=unsubscribe)).status_code == 401
    assert (await client.post(url, json=unsubscribe, headers={"Authorization": "Bearer nope"})).status_code == 401
    auth = {"Authorization": f"Bearer {secret}"}
    response = await client.post(url, json=unsubscribe, headers=auth)
    assert response.status_code == 200 and response.json() == {"received": 1}
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "unsubscribed"
    assert await membership(client, lists["other"]["id"], person["id"]) == "subscribed"

    batch = [
        unsubscribe,  # a replay inside a batch
        {"event": "hard_bounce", "email": person["email"], "id": 2, "date": "2026-11-21 08:00:00",
         "ts": 1763712000, "message-id": "<201798300811.5787683@relay.domain.com>", "ts_event": 1763712000,
         "subject": "Soldes", "tag": "", "sending_ip": "185.41.28.109", "ts_epoch": 1763712000000,
         "reason": "mailbox does not exist"},
        {"event": "opened", "email": person["email"], "id": 3},
        {"event": "unsubscribe", "email": "nobody-we-know@example.com", "list_id": [BREVO_LIST]},
    ]
    response = await client.post(url, json=batch, headers=auth)
    assert response.json() == {"received": 3}  # `opened` is not taken back; the unknown address is not told
    assert (await contact(client, person["id"]))["email_status"] == "bounced"
    spam = {"event": "spam", "email": person["email"], "id": 4, "date": "2026-11-22 08:00:00"}
    assert (await client.post(url, json=spam, headers=auth)).json() == {"received": 1}
    assert (await client.post(url, json=spam, headers=auth)).json() == {"received": 1}
    assert (await contact(client, person["id"]))["email_status"] == "complained"
    ledger = (await client.get(f"/v1/contacts/{person['id']}/consents", headers=ADMIN)).json()
    assert len([e for e in ledger["events"] if e["action"] == "withdrawn"]) == 1  # the replay withdrew nothing
    assert (await client.post(url, content=b"not json", headers=auth)).status_code == 400


async def test_a_destination_of_another_kind_is_not_found(client: httpx.AsyncClient) -> None:
    destination, secret, *_ = await setup(client, "mailchimp")
    response = await client.post(f"/v1/inbound/brevo/{destination['id']}", json={},
                                 headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 404
    assert (await client.post(f"/v1/inbound/brevo/{uuid.uuid4()}", json={})).status_code == 404


async def test_brevo_hostile_bodies_are_4xx_and_change_nothing(client: httpx.AsyncClient) -> None:
    # Audit: a 10,000-deep JSON body escaped the parser's error handling as a RecursionError (500).
    destination, secret, person, lists = await setup(client, "brevo")
    url = f"/v1/inbound/brevo/{destination['id']}"
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    for body in ("[" * 10_000 + "]" * 10_000, '{"a":' * 10_000 + "1" + "}" * 10_000,
                 '{"event":"unsubscribe","email":"' + person["email"] + '","list_id":[' + "[" * 900 + "]" * 900 + "]}"):
        assert_problem(await client.post(url, content=body, headers=auth), 400)
    # events whose address PostgreSQL cannot hold (lone surrogate, NUL) are ignored, as unknown addresses are
    for body in ('[{"event":"unsubscribe","email":"\\ud800@example.com","list_id":[' + str(BREVO_LIST) + ']}]',
                 '{"event":"unsubscribe","email":"x\\u0000@example.com","subject":"\\udfff"}'):
        response = await client.post(url, content=body, headers=auth)
        assert response.status_code == 200 and response.json() == {"received": 0}, (body[:60], response.text)
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "subscribed"


async def test_mailchimp_hostile_forms_change_nothing(client: httpx.AsyncClient) -> None:
    destination, secret, person, lists = await setup(client, "mailchimp")
    url = f"/v1/inbound/mailchimp/{destination['id']}?secret={secret}"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for email in ("x%00%40example.com", "%ED%A0%80%40example.com", "x%C0%40example.com"):
        body = f"type=unsubscribe&data[list_id]={REMOTE}&data[email]={email}"
        response = await client.post(url, content=body, headers=form)
        assert response.status_code == 200, response.text
    upemail = f"type=upemail&data[list_id]={REMOTE}&data[old_email]={person['email']}&data[new_email]=n%00@example.com"
    assert (await client.post(url, content=upemail, headers=form)).status_code in (200, 422)
    deep = "&".join(f"data[merges][{'[x]' * 2000}]=1" for _ in range(3)) + "&type=unsubscribe"
    assert (await client.post(url, content=deep, headers=form)).status_code == 200
    assert await membership(client, lists["mapped"]["id"], person["id"]) == "subscribed"
    assert (await contact(client, person["id"]))["email"] == person["email"]
