"""The delivery pipeline: outbox → deliveries → adapter, with leases, order, coalescing, retries, dead letters.

The adapter here records calls in memory (the network edge); the vendor adapters themselves are tested
against spec-validating fakes in tests/sync/test_brevo.py and friends.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app import worker as worker_module
from app.db import make_sessionmaker
from app.models.base import utc_now
from app.services import delivery
from app.settings import Settings
from app.sync.base import ContactState, DeliveryFailed, Erasure, EventMessage, Gone, Outcome, RetryLater
from app.sync.mailchimp import subscriber_hash
from app.worker import HEARTBEAT_SECONDS, Worker, lane_step
from tests.factories import ADMIN, PROOF, make_contact, make_list

pytestmark = pytest.mark.committing


class RecordingVendor:
    """Remembers the last state pushed per email; can be told to fail the next calls."""

    def __init__(self) -> None:
        self.pushes: list[list[ContactState]] = []
        self.erased: list[Erasure] = []
        self.failures: list[Exception] = []
        self.in_flight: set[uuid.UUID] = set()
        self.overlaps = 0

    async def push(self, states: Sequence[ContactState]) -> list[Outcome]:
        return await self._call(states, lambda s: Outcome(s.contact_id, remote_ref=subscriber_hash(s.email)))

    async def erase(self, erasures: Sequence[Erasure]) -> list[Outcome]:
        self.erased.extend(erasures)
        return [Outcome(e.contact_id) for e in erasures]

    async def _call(self, states: Sequence[ContactState], outcome: Any) -> list[Outcome]:
        ids = {s.contact_id for s in states}
        if ids & self.in_flight:
            self.overlaps += 1
        self.in_flight |= ids
        try:
            await asyncio.sleep(0.01)
            if self.failures:
                raise self.failures.pop(0)
            self.pushes.append(list(states))
            return [outcome(s) for s in states]
        finally:
            self.in_flight -= ids


class RecordingWebhook:
    def __init__(self) -> None:
        self.received: list[EventMessage] = []
        self.failures: list[Exception] = []

    async def send(self, message: EventMessage) -> None:
        await asyncio.sleep(0.001)
        if self.failures:
            raise self.failures.pop(0)
        self.received.append(message)


@pytest.fixture
def sync_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "delivery_backoff_base_seconds": 1.0, "delivery_backoff_cap_seconds": 1.0, "delivery_max_attempts": 3,
        "delivery_lease_seconds": 30.0,
    })


@pytest_asyncio.fixture(loop_scope="session")
async def makers(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)


@pytest.fixture
def vendor() -> RecordingVendor:
    return RecordingVendor()


@pytest.fixture
def hook() -> RecordingWebhook:
    return RecordingWebhook()


@pytest_asyncio.fixture(loop_scope="session")
async def worker(
    makers: async_sessionmaker[AsyncSession], sync_settings: Settings, app: FastAPI, vendor: RecordingVendor,
    hook: RecordingWebhook,
) -> AsyncIterator[Worker]:
    def adapters(destination: Any, _http: httpx.AsyncClient, _settings: Settings) -> Any:
        return hook if destination.kind == "webhook" else vendor

    w = Worker(makers, sync_settings, box=app.state.secret_box, adapters=adapters)
    yield w
    await w.aclose()


async def drain(worker: Worker) -> None:
    async with asyncio.timeout(30):
        await worker.drain()


async def mailchimp_destination(client: httpx.AsyncClient, list_id: str, **extra: Any) -> dict[str, Any]:
    body = {"kind": "mailchimp", "name": f"mc-{uuid.uuid4().hex[:6]}", "config": {"api_key": "0123456789abcdef-us6"},
            "list_mappings": [{"list_id": list_id, "remote_list_id": "remote-news"}],
            "field_mappings": {"first_name": "FNAME"}, **extra}
    response = await client.post("/v1/destinations", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def subscribed_contact(client: httpx.AsyncClient, list_id: str, **fields: Any) -> dict[str, Any]:
    contact = await make_contact(client, **fields)
    response = await client.put(f"/v1/lists/{list_id}/members/{contact['id']}",
                                json={"consent": {"proof": PROOF}}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return contact


async def deliveries(makers: async_sessionmaker[AsyncSession], destination_id: str) -> list[dict[str, Any]]:
    async with makers() as session:
        rows = await session.execute(text("SELECT * FROM delivery WHERE destination_id = :d ORDER BY id"),
                                     {"d": destination_id})
        return [dict(r) for r in rows.mappings()]


async def test_a_subscription_reaches_the_vendor_as_state(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    contact = await subscribed_contact(committing_client, the_list["id"], first_name="Chloé")
    await make_contact(committing_client)  # in no mapped list: nothing for the vendor

    await drain(worker)

    pushed = [s for batch in vendor.pushes for s in batch]
    assert [(s.email, dict(s.lists), dict(s.fields)) for s in pushed] == [
        (contact["email"], {"remote-news": "subscribed"}, {"FNAME": "Chloé"})]
    rows = await deliveries(makers, destination["id"])
    assert [r["status"] for r in rows] == ["delivered"]
    async with makers() as session:
        assert await session.scalar(text("SELECT remote_ref FROM sync_link WHERE contact_id = :c"),
                                    {"c": contact["id"]}) == subscriber_hash(contact['email'])
    # Unsubscribing from the list is pushed as such.
    response = await committing_client.delete(f"/v1/lists/{the_list['id']}/members/{contact['id']}", headers=ADMIN)
    assert response.status_code == 200, response.text
    await drain(worker)
    assert dict(vendor.pushes[-1][0].lists) == {"remote-news": "unsubscribed"}
    # Only a membership changed since the last push: the adapter may skip the profile write, and only that
    # list's status is news (the others go as "if new", never overriding an unsubscribe made at the vendor).
    assert pushed[0].profile_changed and pushed[0].status_changed is None
    assert not vendor.pushes[-1][0].profile_changed and vendor.pushes[-1][0].status_changed == {"remote-news"}


async def test_an_address_removed_in_carnet_leaves_the_vendor(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    """The shop removes a synced contact's address (PATCH email: null, a phone stays): the delivery was marked
    delivered with nothing sent, the link stayed, and the vendor kept mailing the former address as a subscriber.
    Now the vendor's record goes as a merge's retired address does (archived at Mailchimp) and the link is
    forgotten."""
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    contact = await subscribed_contact(committing_client, the_list["id"], phone="+33612345678")
    await drain(worker)
    response = await committing_client.patch(f"/v1/contacts/{contact['id']}", json={"email": None}, headers=ADMIN)
    assert response.status_code == 200 and response.json()["email"] is None
    pushes = len(vendor.pushes)
    await drain(worker)
    assert [r["status"] for r in await deliveries(makers, destination["id"])] == ["delivered", "delivered"]
    assert len(vendor.pushes) == pushes and [(e.contact_id, e.archive) for e in vendor.erased] == [
        (uuid.UUID(contact["id"]), True)]
    async with makers() as session:
        links = await session.scalar(text("SELECT count(*) FROM sync_link WHERE contact_id = :c"), {"c": contact["id"]})
    assert links == 0


async def test_a_burst_of_changes_is_one_push_of_the_latest_state(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
) -> None:
    the_list = await make_list(committing_client)
    await mailchimp_destination(committing_client, the_list["id"])
    contact = await subscribed_contact(committing_client, the_list["id"])
    for name in ("A", "B", "C", "D"):
        response = await committing_client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": name},
                                                  headers=ADMIN)
        assert response.status_code == 200
    await drain(worker)
    assert len(vendor.pushes) == 1
    assert vendor.pushes[0][0].fields == {"FNAME": "D"}


async def test_withdrawn_consent_blocks_marketing_and_erasure_deletes_remotely(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    contact = await subscribed_contact(committing_client, the_list["id"])
    await drain(worker)
    response = await committing_client.post(f"/v1/contacts/{contact['id']}/consents", headers=ADMIN, json={
        "purpose": "email_marketing", "action": "withdrawn", "source": "preference_center"})
    assert response.status_code == 201, response.text
    await drain(worker)
    last = vendor.pushes[-1][0]
    assert last.marketing_blocked and dict(last.lists) == {"remote-news": "unsubscribed"}

    assert (await committing_client.delete(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)
    assert vendor.erased == [Erasure(uuid.UUID(contact["id"]), subscriber_hash(contact['email']))]
    async with makers() as session:
        assert await session.scalar(text("SELECT count(*) FROM sync_link WHERE destination_id = :d"),
                                    {"d": destination["id"]}) == 0


async def test_failures_back_off_then_dead_letter_then_retry_by_hand(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    await subscribed_contact(committing_client, the_list["id"])
    vendor.failures = [DeliveryFailed("vendor answered 503")] * 3

    assert await worker.deliver_once()
    [row] = await deliveries(makers, destination["id"])
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "vendor answered 503")
    assert row["next_attempt_at"] > utc_now()
    for _ in range(2):
        await asyncio.sleep(1.05)
        await worker.deliver_once()
    [row] = await deliveries(makers, destination["id"])
    assert row["status"] == "dead" and "gave up after 3 attempts" in row["last_error"]
    health = (await committing_client.get(f"/v1/destinations/{destination['id']}", headers=ADMIN)).json()["health"]
    assert health["consecutive_failures"] == 3 and health["dead"] == 1 and health["last_error"]

    listed = await committing_client.get(f"/v1/destinations/{destination['id']}/deliveries",
                                         params={"status": "dead"}, headers=ADMIN)
    assert [d["id"] for d in listed.json()["data"]] == [row["id"]]
    retried = await committing_client.post(f"/v1/deliveries/{row['id']}/retry", headers=ADMIN)
    assert retried.status_code == 200 and retried.json()["status"] == "pending"
    await drain(worker)
    [row] = await deliveries(makers, destination["id"])
    assert row["status"] == "delivered"
    health = (await committing_client.get(f"/v1/destinations/{destination['id']}", headers=ADMIN)).json()["health"]
    assert health["consecutive_failures"] == 0 and health["last_success_at"]


async def test_a_dead_push_retried_into_a_newer_one_keeps_the_changes_it_carried(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    """An unsubscribe's push ends dead; the contact changes since (a pending push of the profile). Retried by hand,
    the dead push is folded into the pending one, which did not take over what it was about: the unsubscribe went
    to Mailchimp as `status_if_new` only, so the member stayed subscribed."""
    destination, contact = await _synced_then_unsubscribed(committing_client, worker)
    vendor.failures = [DeliveryFailed("vendor refused", permanent=True)]
    await drain(worker)
    [dead] = [r for r in await deliveries(makers, destination["id"]) if r["status"] == "dead"]
    await committing_client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": "Later"}, headers=ADMIN)
    async with makers.begin() as session:
        await delivery.dispatch(session)
    retried = await committing_client.post(f"/v1/deliveries/{dead['id']}/retry", headers=ADMIN)
    assert retried.status_code == 200 and retried.json()["id"] != dead["id"]   # folded into the newer push
    await drain(worker)
    last = vendor.pushes[-1][0]
    assert dict(last.lists) == {"remote-news": "unsubscribed"} and last.fields == {"FNAME": "Later"}
    assert last.status_changed == {"remote-news"}


async def test_a_resync_retries_the_archive_of_a_merged_away_record_that_ended_dead(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    """docs/sync.md: a contact pushed before and gone since is queued by a resync, "its delivery is the erasure (or
    archive) still owed". A merge whose archive of the duplicate's record ended dead was queued, then planned as
    nothing to do (the plan read "address retired" only from the delivery's own message, and a resync has none):
    delivered, the duplicate still subscribed at the vendor, the person getting every campaign twice."""
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    person = await subscribed_contact(committing_client, the_list["id"])
    duplicate = await subscribed_contact(committing_client, the_list["id"])
    await drain(worker)
    refused = {"n": 1}
    real_erase = vendor.erase

    async def erase_refused_once(erasures: Sequence[Erasure]) -> list[Outcome]:
        if refused["n"]:
            refused["n"] -= 1
            return [Outcome(e.contact_id, error="vendor refused") for e in erasures]
        return await real_erase(erasures)

    vendor.erase = erase_refused_once  # type: ignore[method-assign]
    response = await committing_client.post(f"/v1/contacts/{person['id']}/merge",
                                            json={"duplicate_id": duplicate["id"]}, headers=ADMIN)
    assert response.status_code == 200, response.text
    await drain(worker)
    assert [r["status"] for r in await deliveries(makers, destination["id"])
            if r["contact_id"] == uuid.UUID(duplicate["id"])][-1] == "dead"
    resync = await committing_client.post(f"/v1/destinations/{destination['id']}/resync", headers=ADMIN)
    assert resync.status_code == 202, resync.text
    await drain(worker)
    assert vendor.erased == [Erasure(uuid.UUID(duplicate["id"]), subscriber_hash(duplicate["email"]), archive=True)]


async def test_retry_after_from_the_vendor_is_honoured(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    await subscribed_contact(committing_client, the_list["id"])
    vendor.failures = [RetryLater("429 too many requests", after_seconds=40)]
    before = utc_now()
    await worker.deliver_once()
    [row] = await deliveries(makers, destination["id"])
    assert row["status"] == "pending"
    assert timedelta(seconds=39) < row["next_attempt_at"] - before < timedelta(seconds=45)


async def test_a_change_during_a_push_is_pushed_after_it(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    contact = await subscribed_contact(committing_client, the_list["id"], first_name="Old")
    async with makers.begin() as session:
        await delivery.dispatch(session)
        claimed = await delivery.claim(session, uuid.UUID(destination["id"]), limit=10, lease_seconds=30)
    assert len(claimed.rows) == 1
    await committing_client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": "New"}, headers=ADMIN)
    async with makers.begin() as session:
        await delivery.dispatch(session)
        # Head of line: the newer push waits while the contact is in flight.
        again = await delivery.claim(session, uuid.UUID(destination["id"]), limit=10, lease_seconds=30)
    assert again.rows == []
    async with makers.begin() as session:
        await delivery.complete(session, claimed, delivery.Completion(delivered=[claimed.rows[0]["id"]], dead={},
                                                                       retry={}), backoff=worker.backoff)
    await drain(worker)
    assert vendor.pushes[-1][0].fields == {"FNAME": "New"}


async def test_an_erasure_during_a_first_push_deletes_what_that_push_made(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    """Erased while its first push is in flight: no link yet, but the erasure is owed once the push made one."""
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    contact = await subscribed_contact(committing_client, the_list["id"])
    async with makers.begin() as session:
        await delivery.dispatch(session)
        claimed = await delivery.claim(session, uuid.UUID(destination["id"]), limit=10, lease_seconds=30)
    assert (await committing_client.delete(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 204
    async with makers.begin() as session:
        await delivery.dispatch(session)
        await delivery.complete(session, claimed, delivery.Completion(delivered=[claimed.rows[0]["id"]], dead={},
                                                                       retry={}), backoff=worker.backoff)
        await delivery.remember_links(session, uuid.UUID(destination["id"]),
                                      {uuid.UUID(contact["id"]): subscriber_hash(contact['email'])})
    await drain(worker)
    assert vendor.erased == [Erasure(uuid.UUID(contact["id"]), subscriber_hash(contact['email']))]
    async with makers() as session:
        assert await session.scalar(text("SELECT count(*) FROM sync_link WHERE destination_id = :d"),
                                    {"d": destination["id"]}) == 0


async def test_an_expired_lease_is_taken_over(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    await subscribed_contact(committing_client, the_list["id"])
    async with makers.begin() as session:  # a worker claims, then dies
        await delivery.dispatch(session)
        lost = await delivery.claim(session, uuid.UUID(destination["id"]), limit=10, lease_seconds=0.01)
    await asyncio.sleep(0.05)
    await drain(worker)
    assert len(vendor.pushes) == 1
    # The dead worker coming back late writes nothing over the new owner's result.
    async with makers.begin() as session:
        await delivery.complete(session, lost, delivery.Completion(delivered=[], dead={lost.rows[0]["id"]: "late"},
                                                                    retry={}), backoff=worker.backoff)
    assert [r["status"] for r in await deliveries(makers, destination["id"])] == ["delivered"]


async def test_a_push_lost_with_its_worker_keeps_the_changes_it_carried(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    """A worker dies holding an unsubscribe's push while a profile change of the same contact waits (pending). The
    reaper deleted the expired push in favour of the pending one without merging what it was about, so the next
    push said no list changed: Mailchimp got the list as `status_if_new` only and the member stayed subscribed."""
    destination, contact = await _synced_then_unsubscribed(committing_client, worker)
    async with makers.begin() as session:  # a worker claims the unsubscribe, then dies
        await delivery.dispatch(session)
        lost = await delivery.claim(session, uuid.UUID(destination["id"]), limit=10, lease_seconds=0.01)
    assert len(lost.rows) == 1
    await committing_client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": "Later"}, headers=ADMIN)
    async with makers.begin() as session:  # the change waits behind the push in flight
        await delivery.dispatch(session)
    await asyncio.sleep(0.05)
    await drain(worker)
    last = vendor.pushes[-1][0]
    assert dict(last.lists) == {"remote-news": "unsubscribed"} and last.fields == {"FNAME": "Later"}
    assert last.status_changed == {"remote-news"} and last.profile_changed


async def test_two_workers_never_hold_one_contact_and_keep_event_order(
    committing_client: httpx.AsyncClient, worker: Worker, vendor: RecordingVendor, hook: RecordingWebhook,
    makers: async_sessionmaker[AsyncSession], sync_settings: Settings, app: FastAPI,
) -> None:
    the_list = await make_list(committing_client)
    await mailchimp_destination(committing_client, the_list["id"])
    response = await committing_client.post("/v1/destinations", headers=ADMIN, json={
        "kind": "webhook", "name": "shop-hook", "config": {"url": "https://hooks.shop.example/carnet"}})
    assert response.status_code == 201, response.text
    contacts = [await subscribed_contact(committing_client, the_list["id"]) for _ in range(5)]
    for round_ in range(4):
        for contact in contacts:
            await committing_client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": f"n{round_}"},
                                          headers=ADMIN)
    second = Worker(makers, sync_settings, box=app.state.secret_box, adapters=worker.adapters)
    try:
        async with asyncio.timeout(30):
            while any(await asyncio.gather(worker.deliver_once(), second.deliver_once())):
                pass
    finally:
        await second.aclose()
    assert vendor.overlaps == 0
    final = {s.contact_id: s.fields["FNAME"] for batch in vendor.pushes for s in batch}
    assert set(final.values()) == {"n3"} and len(final) == 5
    for contact in contacts:  # per contact, the webhook saw its messages in the order they were written
        ids = [int(m.id.removeprefix("msg_")) for m in hook.received if m.payload.get("contact_id") == contact["id"]]
        assert ids == sorted(ids) and len(ids) == len(set(ids)) == 7  # created, granted, subscribed, 4 updates


async def test_a_receiver_that_says_gone_disables_the_destination(
    committing_client: httpx.AsyncClient, worker: Worker, hook: RecordingWebhook,
) -> None:
    response = await committing_client.post("/v1/destinations", headers=ADMIN, json={
        "kind": "webhook", "name": "old-hook", "config": {"url": "https://hooks.shop.example/old"}})
    destination = response.json()
    hook.failures = [Gone("receiver answered 410")]
    await make_contact(committing_client)
    await drain(worker)
    shown = (await committing_client.get(f"/v1/destinations/{destination['id']}", headers=ADMIN)).json()
    assert shown["enabled"] is False and shown["health"]["disabled_reason"] == "receiver answered 410"
    assert shown["health"]["dead"] == 1


class SlowReceiver(RecordingWebhook):
    """A receiver that takes a second to answer each delivery."""

    async def send(self, message: EventMessage) -> None:
        await asyncio.sleep(1.0)
        self.received.append(message)


async def test_a_webhook_batch_ends_within_its_lease(
    committing_client: httpx.AsyncClient, makers: async_sessionmaker[AsyncSession], sync_settings: Settings,
    app: FastAPI,
) -> None:
    """The send of a batch is under one overall deadline (80% of the lease, docs/sync.md): each webhook message got
    the whole budget of its own once it had a place among the 8 concurrent sends, so 40 messages at 1 s took
    5 s against a 4 s lease. Another worker then took the expired rows back and sent them again, and this
    batch's completion wrote nothing: every message went twice, and with a backlog at that pace, forever."""
    slow = SlowReceiver()
    local = sync_settings.model_copy(update={"delivery_lease_seconds": 4.0})
    worker = Worker(makers, local, box=app.state.secret_box, adapters=lambda *_: slow)
    response = await committing_client.post("/v1/destinations", headers=ADMIN, json={
        "kind": "webhook", "name": f"slow-{uuid.uuid4().hex[:6]}",
        "config": {"url": "https://hooks.shop.example/slow"}})
    assert response.status_code == 201, response.text
    destination_id = uuid.UUID(response.json()["id"])
    for _ in range(40):
        await make_contact(committing_client)

    async def another_worker_reaps() -> None:
        await asyncio.sleep(4.5)
        async with makers.begin() as session:
            await delivery.reap_expired_leases(session)

    try:
        await worker._dispatch(rounds=10)
        started = asyncio.get_running_loop().time()
        reaping = asyncio.create_task(another_worker_reaps())
        await worker._deliver_batch(destination_id, backlog=asyncio.Event())
        elapsed = asyncio.get_running_loop().time() - started
        await reaping
    finally:
        await worker.aclose()
    rows = {r["message_id"]: r for r in await deliveries(makers, str(destination_id))}
    sent = {int(m.id.removeprefix("msg_")) for m in slow.received}
    assert sent and all(rows[m]["status"] == "delivered" for m in sent)   # what went out is known to have gone
    assert all(r["status"] in ("delivered", "pending") for r in rows.values())
    assert elapsed < 4.0


async def test_a_backlog_drains_through_several_lanes_without_overlap(
    committing_client: httpx.AsyncClient, vendor: RecordingVendor, makers: async_sessionmaker[AsyncSession],
    sync_settings: Settings, app: FastAPI, worker: Worker,
) -> None:
    the_list = await make_list(committing_client)
    await mailchimp_destination(committing_client, the_list["id"])
    contacts = [await subscribed_contact(committing_client, the_list["id"]) for _ in range(9)]
    small = Worker(makers, sync_settings.model_copy(update={"delivery_batch_size": 2}), box=app.state.secret_box,
                   adapters=worker.adapters)
    try:
        await drain(small)
    finally:
        await small.aclose()
    assert vendor.overlaps == 0
    assert sorted(s.email for batch in vendor.pushes for s in batch) == sorted(c["email"] for c in contacts)
    assert max(len(batch) for batch in vendor.pushes) == 2


async def test_one_dispatcher_at_a_time(
    committing_client: httpx.AsyncClient, makers: async_sessionmaker[AsyncSession],
) -> None:
    """Two dispatchers would each take a slice of the backlog: a contact's later message could be claimable
    before its earlier one even had a delivery. The second one waits its turn (does nothing this round)."""
    await make_contact(committing_client)
    async with makers.begin() as first, makers.begin() as second:
        assert await delivery.dispatch(first) >= 1
        assert await delivery.dispatch(second) == 0


async def test_an_unexpected_failure_is_logged_without_its_message(
    committing_client: httpx.AsyncClient, vendor: RecordingVendor, worker: Worker, caplog: pytest.LogCaptureFixture,
    makers: async_sessionmaker[AsyncSession],
) -> None:
    """A bug in an adapter stops neither the worker nor the batch (retried later), and no log line or
    delivery error quotes its message (personal data)."""
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    contact = await subscribed_contact(committing_client, the_list["id"])
    vendor.failures = [ValueError(f"cannot handle {contact['email']}")]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(HEARTBEAT_SECONDS + 0.5)  # a worker sends from its second heartbeat on
    stop.set()
    await running
    assert "delivery.adapter_failed" in caplog.text and "ValueError" in caplog.text
    assert contact["email"] not in caplog.text
    [row] = await deliveries(makers, destination["id"])
    assert (row["status"], row["last_error"]) in {("pending", "ValueError"), ("delivered", None)}


class SlowVendor(RecordingVendor):
    """A rate-limited vendor that can afford two contacts per batch in the time of a lease."""

    def affordable(
        self, states: Sequence[ContactState], erasures: Sequence[Erasure], seconds: float
    ) -> tuple[int, int]:
        return min(len(erasures), 2), min(len(states), max(0, 2 - len(erasures)))


async def test_what_does_not_fit_the_lease_is_handed_back_untried(
    committing_client: httpx.AsyncClient, makers: async_sessionmaker[AsyncSession], sync_settings: Settings,
    app: FastAPI,
) -> None:
    """A batch a rate-limited vendor cannot send within its lease would time out and be retried whole forever:
    the worker sends what fits and puts the rest back as due now, without counting an attempt."""
    slow = SlowVendor()
    worker = Worker(makers, sync_settings, box=app.state.secret_box, adapters=lambda *_: slow)
    the_list = await make_list(committing_client)
    destination = await mailchimp_destination(committing_client, the_list["id"])
    contacts = [await subscribed_contact(committing_client, the_list["id"]) for _ in range(5)]
    try:
        await worker._dispatch(rounds=10)
        assert await worker._deliver_batch(uuid.UUID(destination["id"]), backlog=asyncio.Event()) == (True, 5)
        rows = await deliveries(makers, destination["id"])
        assert sorted(r["status"] for r in rows) == ["delivered"] * 2 + ["pending"] * 3
        assert {r["attempts"] for r in rows if r["status"] == "pending"} == {0}
        await drain(worker)
    finally:
        await worker.aclose()
    assert [len(batch) for batch in slow.pushes] == [2, 2, 1]
    assert {s.contact_id for batch in slow.pushes for s in batch} == {uuid.UUID(c["id"]) for c in contacts}
    assert all(r["status"] == "delivered" for r in await deliveries(makers, destination["id"]))


@pytest.mark.parametrize(
    ("moved", "claimed", "feeding_backlog", "step"),
    [
        (True, 1500, False, "go"),     # a full batch: there is more
        (True, 1500, True, "go"),
        (True, 200, False, "stop"),    # the end of the backlog
        (True, 200, True, "wait"),     # the dispatcher has not caught up yet: more is coming
        (False, 0, True, "wait"),
        (False, 0, False, "stop"),
        (False, 1500, True, "stop"),   # the vendor refused everything: no hammering while dispatch runs
    ],
)
def test_a_lane_waits_for_the_dispatcher_instead_of_retiring(
    moved: bool, claimed: int, feeding_backlog: bool, step: str
) -> None:
    assert lane_step(moved, claimed, batch_size=1500, feeding_backlog=feeding_backlog) == step


async def test_a_dispatch_burst_refreshes_the_planner_statistics(
    committing_client: httpx.AsyncClient, makers: async_sessionmaker[AsyncSession], sync_settings: Settings,
    app: FastAPI, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a big dispatch `delivery` is analyzed at once: a claim planned on statistics from before the burst
    reads every pending row instead of walking its index (docs/performance.md, "Drain")."""
    monkeypatch.setattr(worker_module, "ANALYZE_AFTER_DISPATCHED", 3)
    worker = Worker(makers, sync_settings, box=app.state.secret_box, adapters=lambda *_: RecordingVendor())
    the_list = await make_list(committing_client)
    await mailchimp_destination(committing_client, the_list["id"])
    for _ in range(3):
        await subscribed_contact(committing_client, the_list["id"])
    async with makers() as session:
        before = await session.scalar(text("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'delivery'"))
    try:
        feeding = asyncio.Event()
        assert await worker._feed(feeding) >= 3
    finally:
        await worker.aclose()
    async with makers() as session:
        after = await session.scalar(text("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'delivery'"))
    assert after == before + 1


async def test_a_destination_deleted_while_its_lanes_drain_ends_the_lane_quietly(worker: Worker) -> None:
    """The round lists the destinations, then each lane loads its own: one deleted in between (DELETE
    /v1/destinations, whose deliveries go with it) is nothing owed, not a failed step with lanes left pending."""
    gone = uuid.uuid4()
    assert await worker._deliver_batch(gone, backlog=asyncio.Event()) == (False, 0)
    assert await worker._drain_destination(gone, feeding=asyncio.Event()) is False


async def _synced_then_unsubscribed(client: httpx.AsyncClient, worker: Worker) -> tuple[dict[str, Any], dict[str, Any]]:
    """A contact on a list synced to Mailchimp, pushed, then unsubscribed from that list (the push not sent yet):
    the destination and the contact."""
    the_list = await make_list(client)
    destination = await mailchimp_destination(client, the_list["id"])
    contact = await subscribed_contact(client, the_list["id"])
    await drain(worker)
    response = await client.delete(f"/v1/lists/{the_list['id']}/members/{contact['id']}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return destination, contact
