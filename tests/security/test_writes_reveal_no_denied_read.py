"""Class 11: a write route reveals nothing the token's read scopes deny (docs/security.md, "Class 11").

The attack: a token that may write a resource but not read it (a storefront signup token narrowed to
`contacts:write` + `memberships:write`, as docs/api.md recommends; the `integration` role, which writes events
without `events:read`) sends a write that changes nothing — `PATCH {}`, an upsert with just the address, an event
replayed under another sender's `event_id`, a subscription already in place — and reads the stored record in the
answer. Each write answers such a token a receipt (what was written, nothing the file holds); a token that may
read gets the read model, masked without `pii:read`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.security import Role, Scope
from tests.auth import bearer
from tests.factories import ADMIN, grant_marketing, make_attribute, make_contact, make_list, unique_email
from tests.routers.test_carts import cart
from tests.routers.test_orders import order
from tests.routers.test_segments import make_segment

# docs/api.md's storefront signup token: it may create and subscribe people, never read them.
STOREFRONT = bearer(Role.INTEGRATION, subject="storefront@shop.example",
                    scopes={Scope.CONTACTS_WRITE, Scope.MEMBERSHIPS_WRITE})
# The integration role as it is: events:write without events:read.
INTEGRATION = bearer(Role.INTEGRATION, subject="backoffice@shop.example")
# Reads and writes contacts and events, masked.
MASKED_WRITER = bearer(Role.MANAGER, subject="agency@shop.example", scopes={
    Scope.CONTACTS_READ, Scope.CONTACTS_WRITE, Scope.EVENTS_READ, Scope.EVENTS_WRITE})
# The storefront token, let read the consent ledger: a withdrawal's date is its to read.
CONSENT_READER = bearer(Role.INTEGRATION, subject="storefront@shop.example",
                        scopes={Scope.CONTACTS_WRITE, Scope.MEMBERSHIPS_WRITE, Scope.CONSENTS_READ})

# What the file holds about the person, and no writer in these tests ever sends.
SECRETS = {"phone": "+33698765432", "first_name": "Gwenaëlle", "last_name": "Kervella", "company": "Kerfeunteun SA",
           "job_title": "Armatrice", "birth_date": "1981-03-14",
           "address": {"line1": "7 venelle des Secrets", "city": "Quimperlé", "postal_code": "29300"}}
SECRET_WORDS = ("98765432", "Gwena", "Kervella", "Kerfeunteun", "Armatrice", "1981-03-14", "venelle", "Quimperl",
                "29300", "tier-gold", "vip-secret", "secret-fair")
RECEIPT_KEYS = {"id", "created", "version"}


async def _person(client: httpx.AsyncClient) -> dict[str, Any]:
    tier = (await make_attribute(client, f"tier_{uuid.uuid4().hex[:6]}", "text"))["name"]
    return await make_contact(client, **SECRETS, tags=["vip-secret"], attributes={tier: "tier-gold"})


def _receipt(response: httpx.Response, status: int, person_id: str | None, *, created: bool) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == RECEIPT_KEYS, body
    assert body["created"] is created and isinstance(body["version"], int)
    if person_id is not None:
        assert body["id"] == person_id
    assert response.headers["ETag"] == f'"v{body["version"]}"'
    _nothing_stored(response)
    return body  # type: ignore[no-any-return]


def _nothing_stored(response: httpx.Response) -> None:
    leaked = [word for word in SECRET_WORDS if word in response.text]
    assert not leaked, (leaked, response.text)


async def test_a_contacts_writer_without_contacts_read_gets_a_receipt_from_every_write(
        client: httpx.AsyncClient) -> None:
    person = await _person(client)
    pid, email = person["id"], person["email"]

    # the reported no-op writes
    _receipt(await client.patch(f"/v1/contacts/{pid}", json={}, headers=STOREFRONT), 200, pid, created=False)
    for extra in ({}, {"Idempotency-Key": str(uuid.uuid4())}):  # the fast path and FastAPI's route
        _receipt(await client.post("/v1/contacts/upsert", json={"email": email}, headers={**STOREFRONT, **extra}),
                 200, pid, created=False)
    # an upsert with attributes or tags takes the transactional path
    _receipt(await client.post("/v1/contacts/upsert", json={"email": email, "tags": ["newsletter"]},
                               headers=STOREFRONT), 200, pid, created=False)
    # tags, both ways
    _receipt(await client.put(f"/v1/contacts/{pid}/tags/promo", headers=STOREFRONT), 200, pid, created=False)
    _receipt(await client.delete(f"/v1/contacts/{pid}/tags/promo", headers=STOREFRONT), 200, pid, created=False)
    # creations
    created = _receipt(await client.post("/v1/contacts", json={"email": unique_email()}, headers=STOREFRONT),
                       201, None, created=True)
    _receipt(await client.post("/v1/contacts/upsert", json={"email": unique_email()}, headers=STOREFRONT),
             201, None, created=True)
    # a merge keeps the survivor's stored values: the answer shows none of them
    _receipt(await client.post(f"/v1/contacts/{pid}/merge", json={"duplicate_id": created["id"]},
                               headers=STOREFRONT), 200, pid, created=False)
    # a batch answers ids and statuses only
    batch = await client.post("/v1/contacts/batch", json={"items": [{"email": email}, {"email": unique_email()}]},
                              headers=STOREFRONT)
    assert batch.status_code == 200 and [r["status"] for r in batch.json()["results"]] == ["updated", "created"]
    _nothing_stored(batch)
    # the record itself is unharmed, and an admin still reads it whole
    after = (await client.get(f"/v1/contacts/{pid}", headers=ADMIN)).json()
    assert (after["phone"], after["last_name"], after["address"]["city"]) == ("+33698765432", "Kervella", "Quimperlé")


async def test_a_keyed_write_replays_its_receipt(client: httpx.AsyncClient) -> None:
    person = await _person(client)
    keyed = {**STOREFRONT, "Idempotency-Key": str(uuid.uuid4())}
    first = _receipt(await client.post("/v1/contacts/upsert", json={"email": person["email"]}, headers=keyed),
                     200, person["id"], created=False)
    replay = await client.post("/v1/contacts/upsert", json={"email": person["email"]}, headers=keyed)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert _receipt(replay, 200, person["id"], created=False) == first


async def test_a_contacts_writer_with_read_but_without_pii_read_gets_the_masked_contact(
        client: httpx.AsyncClient) -> None:
    person = await _person(client)
    pid, email = person["id"], person["email"]
    duplicate = await make_contact(client)
    answers = [
        await client.patch(f"/v1/contacts/{pid}", json={}, headers=MASKED_WRITER),
        await client.post("/v1/contacts/upsert", json={"email": email}, headers=MASKED_WRITER),
        await client.post("/v1/contacts/upsert", json={"email": email},
                          headers={**MASKED_WRITER, "Idempotency-Key": str(uuid.uuid4())}),
        await client.put(f"/v1/contacts/{pid}/tags/promo", headers=MASKED_WRITER),
        await client.delete(f"/v1/contacts/{pid}/tags/promo", headers=MASKED_WRITER),
        await client.post(f"/v1/contacts/{pid}/merge", json={"duplicate_id": duplicate["id"]}, headers=MASKED_WRITER),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["pii_masked"] is True and body["id"] == pid
        assert body["email"] != email and body["phone"] != SECRETS["phone"] and body["birth_date"] is None
        assert "Kervella" not in answer.text and "venelle" not in answer.text
    made = await client.post("/v1/contacts", json={"email": unique_email(), "last_name": "Nouveau"},
                             headers=MASKED_WRITER)
    assert made.status_code == 201 and made.json()["pii_masked"] is True and made.json()["last_name"] != "Nouveau"


async def test_an_events_writer_without_events_read_cannot_read_a_stored_event_by_its_id(
        client: httpx.AsyncClient) -> None:
    """POST /v1/events with a known `event_id` is a replay: it answered the stored event, whoever sent it."""
    person = await _person(client)
    event_id = f"shop-evt-{uuid.uuid4().hex[:8]}"
    stored = await client.post("/v1/events", headers=ADMIN, json={
        "contact": {"id": person["id"]}, "type": "form_submitted", "occurred_at": "2026-11-02T10:00:00Z",
        "event_id": event_id, "properties": {"message": "call me at home, 7 venelle des Secrets"}})
    assert stored.status_code == 201, stored.text
    mine = await make_contact(client)
    probe = {"contact": {"id": mine["id"]}, "type": "page_view", "occurred_at": "2026-11-03T10:00:00Z",
             "event_id": event_id}
    replay = await client.post("/v1/events", json=probe, headers=INTEGRATION)
    assert replay.status_code == 200, replay.text
    # the id of what is stored under that event_id, and the contact the probe itself named: nothing of the event
    assert replay.json() == {"id": stored.json()["id"], "event_id": event_id, "contact_id": mine["id"],
                             "created": False}
    _nothing_stored(replay)
    assert person["id"] not in replay.text
    fresh = await client.post("/v1/events", headers=INTEGRATION, json={**probe, "event_id": None})
    assert fresh.status_code == 201 and set(fresh.json()) == {"id", "event_id", "contact_id", "created"}
    assert fresh.json()["created"] is True

    # a reader without pii:read gets the stored event masked, as GET /v1/contacts/{id}/events shows it
    masked = await client.post("/v1/events", json=probe, headers=MASKED_WRITER)
    assert masked.status_code == 200 and masked.json()["contact_id"] == person["id"]
    assert masked.json()["properties"]["message"] != "call me at home, 7 venelle des Secrets"
    _nothing_stored(masked)


async def test_a_memberships_writer_without_lists_read_gets_a_receipt(client: httpx.AsyncClient) -> None:
    person = await _person(client)
    the_list = await make_list(client)
    await grant_marketing(client, person["id"])
    path = f"/v1/lists/{the_list['id']}/members/{person['id']}"
    first = await client.put(path, json={"source": "secret-fair-2026"}, headers=ADMIN)
    assert first.status_code == 201, first.text

    again = await client.put(path, headers=STOREFRONT)
    assert again.status_code == 200, again.text
    assert again.json() == {"list_id": the_list["id"], "contact_id": person["id"], "status": "subscribed",
                            "created": False}
    _nothing_stored(again)
    left = await client.delete(path, headers=STOREFRONT)
    assert left.status_code == 200, left.text
    assert left.json() == {"list_id": the_list["id"], "contact_id": person["id"], "status": "unsubscribed",
                           "created": False}
    _nothing_stored(left)
    newcomer = await make_contact(client)
    joined = await client.put(f"/v1/lists/{the_list['id']}/members/{newcomer['id']}", headers=STOREFRONT, json={
        "consent": {"proof": {"ip": "203.0.113.9", "wording": "Oui"}}})
    assert joined.status_code == 201 and joined.json()["created"] is True and joined.json()["status"] == "subscribed"
    # a reader of lists still gets the membership
    member = await client.get(f"/v1/lists/{the_list['id']}/members", headers=ADMIN)
    assert any(m["source"] == "secret-fair-2026" for m in member.json()["data"])


def _refusal(response: httpx.Response, field: str, code: str) -> dict[str, Any]:
    """A subscribe refusal keeps its status, problem type and code (clients branch on them)."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["errors"][0]["field"] == field and body["errors"][0]["code"] == code, body
    return body  # type: ignore[no-any-return]


async def test_a_subscribe_refusal_quotes_nothing_the_token_may_not_read(
        client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]) -> None:
    """The refusals of PUT /v1/lists/{id}/members/{contact_id} quoted a consent's and a membership's dates, the
    contact's email_status and kind, the list's kinds: consents:read's, lists:read's, contacts:read's facts."""
    the_list = await make_list(client)
    # withdrawn: the date is the ledger's (consents:read)
    withdrawn = await make_contact(client)
    await grant_marketing(client, withdrawn["id"], occurred_at="2026-01-01T00:00:00Z")
    assert (await client.post(f"/v1/contacts/{withdrawn['id']}/consents", headers=ADMIN, json={
        "purpose": "email_marketing", "action": "withdrawn", "occurred_at": "2026-05-01T00:00:00Z"})).status_code == 201
    path = f"/v1/lists/{the_list['id']}/members/{withdrawn['id']}"
    refused = _refusal(await client.put(path, headers=STOREFRONT), "consent", "consent_required")
    assert refused["type"].endswith("/consent-required") and "withdrawn_at" not in refused
    assert "2026-05-01" not in json.dumps(refused) and "withdrawn" not in json.dumps(refused)
    shown = _refusal(await client.put(path, headers=CONSENT_READER), "consent", "consent_required")
    assert shown["withdrawn_at"] == "2026-05-01T00:00:00Z"
    # left this list: the membership's date (lists:read)
    left = await make_contact(client)
    await grant_marketing(client, left["id"], occurred_at="2026-01-01T00:00:00Z")
    path = f"/v1/lists/{the_list['id']}/members/{left['id']}"
    assert (await client.put(path, headers=ADMIN)).status_code == 201
    left_at = (await client.delete(path, headers=ADMIN)).json()["unsubscribed_at"]
    refused = _refusal(await client.put(path, headers=STOREFRONT), "consent", "consent_required")
    assert "unsubscribed_at" not in refused and left_at[:10] not in json.dumps(refused)
    assert _refusal(await client.put(path, headers=ADMIN), "consent", "consent_required")["unsubscribed_at"] == left_at
    # the same refusal in a batch's item
    batch = await client.post(f"/v1/lists/{the_list['id']}/members/batch", json={"add": [left["id"]]},
                              headers=STOREFRONT)
    assert batch.status_code == 200 and batch.json()["results"][0]["status"] == "error"
    assert "unsubscribed_at" not in batch.json()["results"][0]["error"] and left_at[:10] not in batch.text
    # a bounced address: the contact's email_status (contacts:read)
    bounced = await make_contact(client)
    async with sessions() as session, session.begin():
        await session.execute(text("UPDATE contact SET email_status = 'complained' WHERE id = :c"),
                              {"c": bounced["id"]})
    refused = _refusal(await client.put(f"/v1/lists/{the_list['id']}/members/{bounced['id']}", headers=STOREFRONT),
                       "contact.email", "email_undeliverable")
    assert "complained" not in json.dumps(refused)
    # a kind the list does not take: the contact's kind (contacts:read) and the list's kinds (lists:read)
    vendors_only = await make_list(client, accepted_kinds=["vendor"])
    prospect = await make_contact(client, kind="prospect")
    path = f"/v1/lists/{vendors_only['id']}/members/{prospect['id']}"
    refused = _refusal(await client.put(path, headers=STOREFRONT), "contact.kind", "kind_not_accepted")
    assert "prospect" not in json.dumps(refused) and "vendor" not in json.dumps(refused)
    shown = _refusal(await client.put(path, headers=ADMIN), "contact.kind", "kind_not_accepted")
    assert "prospect" in shown["detail"] and "vendor" in shown["detail"]


# The shop's order feed, narrowed to writing: it may not read an order back (orders:read).
ORDERS_WRITER = bearer(Role.INTEGRATION, subject="feed@shop.example", scopes={Scope.ORDERS_WRITE})
ORDER_RECEIPT_KEYS = {"id", "external_id", "created", "version"}


def _order_receipt(response: httpx.Response, status: int, *, created: bool) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ORDER_RECEIPT_KEYS and body["created"] is created, body
    assert response.headers["ETag"] == f'"v{body["version"]}"'  # the one If-Match needs
    return body  # type: ignore[no-any-return]


async def test_an_orders_writer_without_orders_read_gets_a_receipt(client: httpx.AsyncClient) -> None:
    """PUT /v1/orders|carts/{ext} answered the stored row: its created_at, on a replay its updated_at, a converted
    cart's order; a 412 quoted the stored version (updated_at in microseconds), cart-closed named the order."""
    person = await make_contact(client)
    suffix = uuid.uuid4().hex[:8]
    cart_ext, order_ext = f"K-{suffix}", f"O-secret-{suffix}"
    placed = order({"id": person["id"]})
    stored = await client.put(f"/v1/orders/{order_ext}", json=placed, headers=ADMIN)
    assert stored.status_code == 201, stored.text
    created_at = stored.json()["created_at"]

    replayed = await client.put(f"/v1/orders/{order_ext}", json=placed, headers=ORDERS_WRITER)
    replay = _order_receipt(replayed, 200, created=False)
    assert replay["id"] == stored.json()["id"] and replay["external_id"] == order_ext
    assert created_at[:16] not in replayed.text and stored.headers["ETag"] == f'"v{replay["version"]}"'
    stale = await client.put(f"/v1/orders/{order_ext}", json=placed, headers={**ORDERS_WRITER, "If-Match": '"v1"'})
    assert stale.status_code == 412 and stale.json()["type"].endswith("/precondition-failed")
    assert "current_version" not in stale.json() and str(replay["version"]) not in stale.text
    # an admin's 412 still says where the order is
    assert (await client.put(f"/v1/orders/{order_ext}", json=placed, headers={**ADMIN, "If-Match": '"v1"'})
            ).json()["current_version"] == replay["version"]
    _order_receipt(await client.put(f"/v1/orders/O-new-{suffix}", json=placed, headers=ORDERS_WRITER), 201,
                   created=True)

    # a cart converted by the order: neither its replay nor its refusal names that order
    basket = cart({"id": person["id"]})
    assert (await client.put(f"/v1/carts/{cart_ext}", json=basket, headers=ADMIN)).status_code == 201
    converting = await client.put(f"/v1/orders/{order_ext}", json={**placed, "cart_external_id": cart_ext},
                                  headers=ADMIN)
    assert converting.status_code == 200, converting.text
    closed = await client.put(f"/v1/carts/{cart_ext}", json={**basket, "currency": "USD"}, headers=ORDERS_WRITER)
    assert closed.status_code == 409 and closed.json()["type"].endswith("/cart-closed")
    assert order_ext not in closed.text
    again = await client.put(f"/v1/carts/{cart_ext}", json={**basket, "status": "converted"}, headers=ORDERS_WRITER)
    _order_receipt(again, 200, created=False)
    assert order_ext not in again.text and created_at[:16] not in again.text
    assert order_ext in (await client.put(f"/v1/carts/{cart_ext}", json={**basket, "currency": "USD"},
                                          headers=ADMIN)).text


# Keeps the catalogue (lists, segments, attribute definitions) without reading it.
CATALOGUE_WRITER = bearer(Role.MANAGER, subject="catalogue@shop.example",
                          scopes={Scope.LISTS_WRITE, Scope.SEGMENTS_WRITE, Scope.ATTRIBUTES_WRITE})


def _version_receipt(response: httpx.Response, key: str, value: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {key, "version"} and body[key] == value, body
    assert response.headers["ETag"] == f'"v{body["version"]}"'
    assert "secret-fair" not in response.text
    return body  # type: ignore[no-any-return]


async def test_a_definitions_writer_without_the_read_scope_gets_a_receipt_from_patch(
        client: httpx.AsyncClient) -> None:
    """PATCH {} on a list, a segment or an attribute answered the whole definition (a list's counts too); an
    attribute's refused options named the stored ones."""
    the_list = await make_list(client, description="secret-fair visitors")
    segment = await make_segment(client, {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"}]},
                                 description="secret-fair leads")
    attribute = await make_attribute(client, f"size_{uuid.uuid4().hex[:6]}", "enum", options=["secret-fair-xl"],
                                     description="secret-fair sizes")
    before = _version_receipt(await client.patch(f"/v1/lists/{the_list['id']}", json={}, headers=CATALOGUE_WRITER),
                              "id", the_list["id"])
    renamed = await client.patch(f"/v1/lists/{the_list['id']}", json={"name": f"l-{uuid.uuid4().hex[:6]}"},
                                 headers={**CATALOGUE_WRITER, "If-Match": f'"v{before["version"]}"'})
    assert _version_receipt(renamed, "id", the_list["id"])["version"] == before["version"] + 1
    _version_receipt(await client.patch(f"/v1/segments/{segment['id']}", json={}, headers=CATALOGUE_WRITER),
                     "id", segment["id"])
    path = f"/v1/attributes/{attribute['name']}"
    _version_receipt(await client.patch(path, json={}, headers=CATALOGUE_WRITER), "name", attribute["name"])
    refused = await client.patch(path, json={"options": []}, headers=CATALOGUE_WRITER)
    assert refused.status_code == 422 and refused.json()["errors"][0]["code"] == "options_removed"
    assert "secret-fair" not in refused.text
    # a reader still gets the definitions
    assert (await client.patch(path, json={}, headers=ADMIN)).json()["description"] == "secret-fair sizes"
    assert "secret-fair-xl" in (await client.patch(path, json={"options": []}, headers=ADMIN)).text


# Runs the sync (retries, settings) without reading its log or its destinations.
SYNC_OPERATOR = bearer(Role.MANAGER, subject="ops@shop.example", scopes={Scope.DESTINATIONS_WRITE})


async def test_a_destinations_writer_without_destinations_read_gets_receipts(
        client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]) -> None:
    """POST /v1/deliveries/{id}/retry answered the delivery (its destination, contact, topic, last error), also on
    a delivered one where nothing changes, and delivery ids are sequential; PATCH /v1/destinations/{id} {}
    answered the destination."""
    the_list = await make_list(client)
    made = await client.post("/v1/destinations", headers=ADMIN, json={
        "name": f"secret-fair-{uuid.uuid4().hex[:6]}", "kind": "mailchimp", "config": {"api_key": "k" * 20 + "-us6"},
        "list_mappings": [{"list_id": the_list["id"], "remote_list_id": "secret-fair-list"}]})
    assert made.status_code == 201, made.text
    destination = made.json()
    person = await make_contact(client)
    await grant_marketing(client, person["id"])
    assert (await client.put(f"/v1/lists/{the_list['id']}/members/{person['id']}", headers=ADMIN)).status_code == 201
    assert (await client.post(f"/v1/destinations/{destination['id']}/resync", headers=ADMIN)).json() == {"queued": 1}
    [queued] = (await client.get(f"/v1/destinations/{destination['id']}/deliveries", headers=ADMIN)).json()["data"]
    async with sessions() as session, session.begin():
        await session.execute(text("UPDATE delivery SET status = 'delivered', delivered_at = now(), "
                                   "last_error = 'secret-fair: vendor hiccup' WHERE id = :i"), {"i": queued["id"]})

    delivered = await client.post(f"/v1/deliveries/{queued['id']}/retry", headers=SYNC_OPERATOR)
    assert delivered.status_code == 200, delivered.text
    assert delivered.json() == {"id": queued["id"], "status": "delivered"}
    assert person["id"] not in delivered.text and destination["id"] not in delivered.text
    async with sessions() as session, session.begin():
        await session.execute(text("UPDATE delivery SET status = 'dead' WHERE id = :i"), {"i": queued["id"]})
    retried = await client.post(f"/v1/deliveries/{queued['id']}/retry", headers=SYNC_OPERATOR)
    assert retried.json() == {"id": queued["id"], "status": "pending"}
    # a reader of destinations still gets the delivery
    shown = await client.post(f"/v1/deliveries/{queued['id']}/retry", headers=ADMIN)
    assert shown.json()["contact_id"] == person["id"]

    patched = await client.patch(f"/v1/destinations/{destination['id']}", json={}, headers=SYNC_OPERATOR)
    assert patched.status_code == 200, patched.text
    assert patched.json() == {"id": destination["id"], "version": destination["version"]}
    assert patched.headers["ETag"] == f'"v{destination["version"]}"' and "secret-fair" not in patched.text


async def test_a_refused_delete_quotes_nothing_the_token_may_not_read(
        client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]) -> None:
    """A refused DELETE named what blocks it from other scopes: the destinations syncing a segment
    (destinations:read), how many contacts hold an attribute (contacts:read), how many erased people a destination
    may hold (destinations:read). The type and status stay; the facts go to readers only."""
    segment = await make_segment(client, {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"}]})
    synced = await client.post("/v1/destinations", headers=ADMIN, json={
        "name": f"secret-fair-{uuid.uuid4().hex[:6]}", "kind": "brevo",
        "config": {"api_key": "xkeysib-0123456789abcdef0123456789abcdef"},
        "segment_mappings": [{"segment_id": segment["id"], "remote_list_id": "9"}]})
    assert synced.status_code == 201, synced.text
    writer = bearer(Role.MANAGER, subject="ops@shop.example", scopes={
        Scope.SEGMENTS_WRITE, Scope.ATTRIBUTES_WRITE, Scope.DESTINATIONS_WRITE})
    in_use = await client.delete(f"/v1/segments/{segment['id']}", headers=writer)
    assert in_use.status_code == 409 and in_use.json()["type"].endswith("/segment-in-use")
    assert "secret-fair" not in in_use.text
    assert "secret-fair" in (await client.delete(f"/v1/segments/{segment['id']}", headers=ADMIN)).text

    attribute = await make_attribute(client, f"size_{uuid.uuid4().hex[:6]}", "text")
    for _ in range(3):
        await make_contact(client, attributes={attribute["name"]: "XL"})
    held = await client.delete(f"/v1/attributes/{attribute['name']}", headers=writer)
    assert held.status_code == 409 and held.json()["type"].endswith("/attribute-in-use")
    assert "contacts" not in held.json() and not held.json()["detail"][0].isdigit()
    assert (await client.delete(f"/v1/attributes/{attribute['name']}", headers=ADMIN)).json()["contacts"] == 3

    async with sessions() as session, session.begin():  # a person erased here, still held by the vendor
        await session.execute(text("INSERT INTO sync_link (destination_id, contact_id, remote_ref, synced_at) "
                                   "VALUES (:d, :c, 'gone', now())"), {"d": synced.json()["id"], "c": uuid.uuid4()})
    owed = await client.delete(f"/v1/destinations/{synced.json()['id']}", headers=writer)
    assert owed.status_code == 409 and owed.json()["type"].endswith("/destination-owes-erasures")
    assert "erasures_owed" not in owed.json() and not owed.json()["detail"][0].isdigit()
    assert (await client.delete(f"/v1/destinations/{synced.json()['id']}", headers=ADMIN)).json()["erasures_owed"] == 1
