"""Class 7: an id learned from a vendor is checked against its documented format before it is stored or used
(issue 15, finding 7).

The attack: a vendor answer (a compromised account, a broken proxy, a man in the middle of `base_url`) carries
an id of its choosing. Brevo documents contact ids as integers (int64) and Carnet's own ids as positive; the
review saw a negative one stored and later sent back as `DELETE /contacts/-5327362998245603?identifierType=
email_id`. Here a Brevo fake that validates every request against Brevo's spec lies about the ids; no request
may ever be built from the lie, and the delivery that met it fails with a reason that says so.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import JSONResponse, Response

from app.worker import Worker
from tests.factories import ADMIN, PROOF, make_contact, make_list
from tests.fakes.brevo import FakeBrevo
from tests.fakes.server import LiveServer, Seen
from tests.sync.keys import BREVO_KEY

pytestmark = pytest.mark.committing

LIE = -5327362998245603


class LyingBrevo(FakeBrevo):
    """Brevo, except that the contact ids in its answers are `LIE` (on creation, and on lookup if asked)."""

    def __init__(self, *, lie_on_lookup: bool) -> None:
        super().__init__(api_key=BREVO_KEY, lists={7})
        self.lie_on_lookup = lie_on_lookup

    def _createContact(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                       seen: Seen) -> Response:
        answer = super()._createContact(params, query, body, seen)
        return JSONResponse({"id": LIE}, 201) if answer.status_code == 201 else answer

    def _getContactInfo(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                        seen: Seen) -> Response:
        answer = super()._getContactInfo(params, query, body, seen)
        if self.lie_on_lookup and answer.status_code == 200:
            contact = self.by_email(params["identifier"])
            assert contact is not None
            return JSONResponse({"id": LIE, "email": contact.email, "emailBlacklisted": False,
                                 "smsBlacklisted": False, "createdAt": "2026-11-23T10:00:00.000+01:00",
                                 "modifiedAt": "2026-11-23T10:00:00.000+01:00", "attributes": {}, "listIds": [],
                                 "statistics": {}})
        return answer

    def built_from_the_lie(self) -> list[str]:
        return [f"{s.method} {s.path}" for s in self.seen if str(abs(LIE)) in s.path]


async def _drain(worker: Worker) -> None:
    async with asyncio.timeout(60):
        await worker.drain()


async def _synced_person(client: httpx.AsyncClient, url: str, worker: Worker | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Brevo destination at `url`, a person subscribed to its mapped list, pushed when a worker is given."""
    news = await make_list(client)
    destination = await client.post("/v1/destinations", headers=ADMIN, json={
        "name": f"brevo-{uuid.uuid4().hex[:6]}", "kind": "brevo", "config": {"api_key": BREVO_KEY, "base_url": url},
        "list_mappings": [{"list_id": news["id"], "remote_list_id": "7"}]})
    assert destination.status_code == 201, destination.text
    person = await make_contact(client)
    subscribed = await client.put(f"/v1/lists/{news['id']}/members/{person['id']}", headers=ADMIN,
                                  json={"consent": {"proof": PROOF}})
    assert subscribed.status_code in (200, 201), subscribed.text
    if worker is not None:
        await _drain(worker)
    return destination.json(), person


async def _erase(client: httpx.AsyncClient, worker: Worker, person: dict[str, Any]) -> None:
    assert (await client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
    await _drain(worker)


async def _deliveries(client: httpx.AsyncClient, destination_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/destinations/{destination_id}/deliveries", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


async def test_a_lying_contact_id_is_never_stored_nor_sent_back(
    committing_client: httpx.AsyncClient, worker: Worker,
) -> None:
    liar = LyingBrevo(lie_on_lookup=True)
    with LiveServer(liar) as live:
        destination, person = await _synced_person(committing_client, live.url, worker)
        [push] = await _deliveries(committing_client, destination["id"])
        assert push["status"] == "dead"
        assert push["last_error"] == "Brevo upsert: no valid contact id (a positive integer) in Brevo's answers"
        await _erase(committing_client, worker, person)
    assert liar.built_from_the_lie() == []
    assert liar.violations == []


async def test_an_id_the_lookup_confirms_replaces_the_lie_and_erasure_reaches_the_person(
    committing_client: httpx.AsyncClient, worker: Worker,
) -> None:
    liar = LyingBrevo(lie_on_lookup=False)
    with LiveServer(liar) as live:
        destination, person = await _synced_person(committing_client, live.url, worker)
        assert {d["status"] for d in await _deliveries(committing_client, destination["id"])} == {"delivered"}
        assert liar.members(7) == {person["email"]}
        await _erase(committing_client, worker, person)
    assert liar.by_email(person["email"]) is None and liar.deleted == [person["email"]]
    assert liar.built_from_the_lie() == []
    assert liar.violations == []


async def test_a_lie_stored_before_the_check_is_never_used(
    committing_client: httpx.AsyncClient, worker: Worker, engine: AsyncEngine,
) -> None:
    """A reference an earlier version stored from a lying answer: the erasure that meets it fails, clearly."""
    liar = LyingBrevo(lie_on_lookup=False)
    with LiveServer(liar) as live:
        destination, person = await _synced_person(committing_client, live.url)
        async with engine.begin() as connection:
            await connection.execute(text(
                "INSERT INTO sync_link (destination_id, contact_id, remote_ref, synced_at) VALUES (:d, :c, :r, now())"),
                {"d": destination["id"], "c": person["id"], "r": str(LIE)})
        await _erase(committing_client, worker, person)
        deliveries = await _deliveries(committing_client, destination["id"])
        erasures = [d for d in deliveries if d["topic"] == "contact.erased"]
        assert [(d["status"], d["last_error"]) for d in erasures] == [
            ("dead", "Brevo delete: the stored reference is not a Brevo contact id")]
    assert liar.built_from_the_lie() == []
    assert liar.violations == []


async def test_list_ids_bound_for_vendor_urls_are_checked_where_they_enter_and_where_they_are_used(
    committing_client: httpx.AsyncClient, worker: Worker, engine: AsyncEngine,
) -> None:
    """Remote list ids travel in vendor URL paths (`/contacts/lists/{listId}`, `/lists/{list_id}/members`): one that
    is not the vendor's format is a 422 naming it, and one stored behind the API stops the destination, said why."""
    news = await make_list(committing_client)
    for kind, remote in (("brevo", "-7"), ("brevo", "7/../../contacts"), ("brevo", "9223372036854775808"),
                         ("mailchimp", "a6b5/../x"), ("mailchimp", "a6b5?x=1")):
        response = await committing_client.post("/v1/destinations", headers=ADMIN, json={
            "name": f"{kind}-{uuid.uuid4().hex[:6]}", "kind": kind, "config": {"api_key": BREVO_KEY + "-us6"},
            "list_mappings": [{"list_id": news["id"], "remote_list_id": remote}]})
        assert response.status_code == 422, (remote, response.text)
        assert [e["field"] for e in response.json()["errors"]] == ["list_mappings[0].remote_list_id"]
    liar = LyingBrevo(lie_on_lookup=False)
    with LiveServer(liar) as live:
        destination, _person = await _synced_person(committing_client, live.url)
        async with engine.begin() as connection:
            await connection.execute(text(
                "UPDATE destination SET list_mappings = jsonb_set(list_mappings, '{0,remote_list_id}', '\"7/../x\"') "
                "WHERE id = :id"), {"id": destination["id"]})
        await _drain(worker)
        state = (await committing_client.get(f"/v1/destinations/{destination['id']}", headers=ADMIN)).json()
    assert liar.seen == []
    assert state["enabled"] is False
    assert state["health"]["disabled_reason"] == (
        "list_mappings[0].remote_list_id: not a list id of this vendor; fix the mapping")


async def test_a_reference_kept_as_an_address_by_an_earlier_version_still_syncs(
    committing_client: httpx.AsyncClient, worker: Worker, engine: AsyncEngine,
) -> None:
    """The checks refuse to *store* a malformed id; a legacy reference (the address) already held is still used for
    a membership-only push, and replaced by the id at the next profile write."""
    brevo = FakeBrevo(api_key=BREVO_KEY, lists={7})
    with LiveServer(brevo) as live:
        destination, person = await _synced_person(committing_client, live.url, worker)
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE sync_link SET remote_ref = :email WHERE contact_id = :c"),
                                     {"email": person["email"], "c": person["id"]})
        news_id = destination["list_mappings"][0]["list_id"]
        left = await committing_client.delete(f"/v1/lists/{news_id}/members/{person['id']}", headers=ADMIN)
        assert left.status_code == 200, left.text
        await _drain(worker)
    assert {d["status"] for d in await _deliveries(committing_client, destination["id"])} == {"delivered"}
    assert brevo.members(7) == set() and brevo.violations == []
