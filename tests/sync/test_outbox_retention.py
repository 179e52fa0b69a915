"""Outbox retention: what the purge takes (delivered, older than the window) and what it never takes (anything
a destination is still owed, and the messages those deliveries read).

The rows of these tests are dated in 2000 and the purge keeps ten years, so it only ever takes them: other
tests' rows in this database are left alone. The sweep walks messages in id order and ends at the first one
written after the cutoff, so earlier tests' messages (dispatched recently: never purgeable here) are dated back
too, for the walk to pass them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models.base import utc_now
from app.services import outbox_retention
from app.services.outbox_retention import OutboxRetention, purge_messages
from app.settings import Settings
from app.sync.base import DeliveryFailed
from app.worker import Worker
from tests.factories import ADMIN
from tests.sync.test_worker import RecordingWebhook, drain, hook, makers, sync_settings, vendor, worker  # noqa: F401 (fixtures)

pytestmark = pytest.mark.committing

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
TEN_YEARS = 87_600.0


async def webhook_destination(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/destinations", headers=ADMIN, json={
        "kind": "webhook", "name": f"hook-{uuid.uuid4().hex[:6]}", "config": {"url": "https://hooks.example/x"}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def message(session: AsyncSession, *, dispatched: bool = True) -> int:
    return int(await session.scalar(text("""
        INSERT INTO outbox_message (topic, contact_id, payload, created_at, dispatched_at)
        VALUES ('contact.updated', NULL, '{}', :at, :dispatched_at)
        RETURNING id"""), {"at": LONG_AGO, "dispatched_at": LONG_AGO if dispatched else None}))


async def delivery_of(session: AsyncSession, destination_id: str, message_id: int, status: str) -> int:
    return int(await session.scalar(text("""
        INSERT INTO delivery (destination_id, contact_id, message_id, topic, coalesces, profile_changed,
                              changed_lists, status, attempts, next_attempt_at, lease_until, created_at, updated_at,
                              delivered_at)
        VALUES (:d, :c, :m, 'contact.updated', false, true, '{}', :status, 1, :at, :lease_until, :at, :at,
                :delivered_at)
        RETURNING id"""), {"d": destination_id, "c": uuid.uuid4(), "m": message_id, "status": status,
                           "at": LONG_AGO, "delivered_at": LONG_AGO if status == "delivered" else None,
                           "lease_until": utc_now() + timedelta(hours=1) if status == "in_flight" else None}))


async def date_back_earlier_messages(session: AsyncSession) -> None:
    await session.execute(text("UPDATE outbox_message SET created_at = :at"), {"at": LONG_AGO})


async def sweep(sessions: async_sessionmaker[AsyncSession], settings: Settings, *, batch: int) -> None:
    """One whole sweep of the job, as the worker runs it."""
    job = OutboxRetention(batch=batch)
    while await job(sessions, settings):
        pass


async def existing(session: AsyncSession, table: str, ids: Sequence[int]) -> set[int]:
    return set((await session.scalars(text(f"SELECT id FROM {table} WHERE id = ANY(:ids)"),  # noqa: S608
                                      {"ids": list(ids)})).all())


async def test_only_what_was_delivered_before_the_window_goes(
    committing_client: httpx.AsyncClient, makers: async_sessionmaker[AsyncSession], settings: Settings,  # noqa: F811
) -> None:
    hook_a, hook_b = await webhook_destination(committing_client), await webhook_destination(committing_client)
    keep = settings.model_copy(update={"outbox_keep_delivered_hours": TEN_YEARS})
    async with makers.begin() as session:
        await date_back_earlier_messages(session)
        m: dict[str, int] = {}
        d: dict[str, int] = {}
        # Messages held by a dead letter come first in id order: the sweep walks past them (batches of 2).
        for status in ("dead", "pending", "in_flight"):
            m[status] = await message(session)
            d[status] = await delivery_of(session, hook_a, m[status], status)
        m["half"] = await message(session)            # delivered to one destination, dead at the other
        d["half_ok"] = await delivery_of(session, hook_a, m["half"], "delivered")
        d["half_dead"] = await delivery_of(session, hook_b, m["half"], "dead")
        m["undispatched"] = await message(session, dispatched=False)
        for name in ("delivered", "delivered_2", "nobody"):
            m[name] = await message(session)
        d["delivered"] = await delivery_of(session, hook_a, m["delivered"], "delivered")
        d["delivered_2"] = await delivery_of(session, hook_b, m["delivered_2"], "delivered")
        m["recent"] = await message(session)
        d["recent"] = await delivery_of(session, hook_a, m["recent"], "delivered")
        # Delivered a minute ago, dispatched long ago: the delivery stays for the window, the message is no
        # longer needed by anyone.
        await session.execute(text("UPDATE delivery SET delivered_at = now() WHERE id = :id"), {"id": d["recent"]})
        # Written, dispatched and delivered just now: all of it stays for the window.
        m["young"] = await message(session)
        d["young"] = await delivery_of(session, hook_a, m["young"], "delivered")
        await session.execute(text("UPDATE outbox_message SET created_at = now(), dispatched_at = now() "
                                   "WHERE id = :id"), {"id": m["young"]})
        await session.execute(text("UPDATE delivery SET delivered_at = now() WHERE id = :id"), {"id": d["young"]})

    # Batches of 2 from the first of these: the cursor walks past what is held, batch after batch.
    cutoff = utc_now() - timedelta(hours=TEN_YEARS)
    async with makers.begin() as session:
        first = await purge_messages(session, cutoff=cutoff, after=m["dead"] - 1, limit=2)
        second = await purge_messages(session, cutoff=cutoff, after=first.last_id, limit=2)
    assert (first.purged, first.last_id, first.more) == (0, m["pending"], True)
    assert (second.purged, second.last_id, second.more) == (0, m["half"], True)
    await sweep(makers, keep, batch=5000)

    async with makers() as session:
        kept_deliveries = await existing(session, "delivery", list(d.values()))
        kept_messages = await existing(session, "outbox_message", list(m.values()))
    assert kept_deliveries == {d["dead"], d["pending"], d["in_flight"], d["half_dead"], d["recent"], d["young"]}
    assert kept_messages == {m["dead"], m["pending"], m["in_flight"], m["half"], m["undispatched"], m["young"]}


async def test_a_dead_letter_keeps_its_message_until_a_retry_delivers_it(
    committing_client: httpx.AsyncClient, worker: Worker, hook: RecordingWebhook,  # noqa: F811
    makers: async_sessionmaker[AsyncSession], sync_settings: Settings,  # noqa: F811
) -> None:
    destination = await webhook_destination(committing_client)
    response = await committing_client.post("/v1/contacts", json={"email": f"{uuid.uuid4().hex}@shop.example"},
                                            headers=ADMIN)
    contact_id = response.json()["id"]
    hook.failures.append(DeliveryFailed("receiver said 400", permanent=True))
    await drain(worker)
    async with makers.begin() as session:
        dead = (await session.execute(text(
            "SELECT id, message_id FROM delivery WHERE destination_id = :d AND status = 'dead'"),
            {"d": destination})).one()
        # Everything of this test happened long ago, as far as the purge can tell.
        await date_back_earlier_messages(session)
        await session.execute(text("UPDATE outbox_message SET dispatched_at = :at WHERE id = :m"),
                              {"at": LONG_AGO, "m": dead.message_id})
    keep = sync_settings.model_copy(update={"outbox_keep_delivered_hours": TEN_YEARS})
    await sweep(makers, keep, batch=5000)

    response = await committing_client.post(f"/v1/deliveries/{dead.id}/retry", headers=ADMIN)
    assert response.status_code == 200, response.text
    await drain(worker)
    sent = [m for m in hook.received if m.id == f"msg_{dead.message_id}"]
    assert [(m.topic, m.payload["contact_id"]) for m in sent] == [("contact.created", contact_id)]

    async with makers.begin() as session:
        await session.execute(text("UPDATE delivery SET delivered_at = :at WHERE id = :id"),
                              {"at": LONG_AGO, "id": dead.id})
    await sweep(makers, keep, batch=5000)
    async with makers() as session:
        assert await existing(session, "delivery", [dead.id]) == set()
        assert await existing(session, "outbox_message", [dead.message_id]) == set()


async def test_the_job_waits_for_its_interval_between_sweeps(
    committing_client: httpx.AsyncClient, makers: async_sessionmaker[AsyncSession], settings: Settings,  # noqa: F811
) -> None:
    destination = await webhook_destination(committing_client)
    keep = settings.model_copy(update={"outbox_keep_delivered_hours": TEN_YEARS, "outbox_purge_seconds": 3600})
    job = OutboxRetention()
    async with makers.begin() as session:
        await date_back_earlier_messages(session)
    while await job(makers, keep):
        pass
    async with makers.begin() as session:
        later = await delivery_of(session, destination, await message(session), "delivered")
    assert await job(makers, keep) is False  # idle until the next sweep is due
    async with makers() as session:
        assert await existing(session, "delivery", [later]) == {later}
    await sweep(makers, keep, batch=5000)  # a sweep that is due takes it
    async with makers() as session:
        assert await existing(session, "delivery", [later]) == set()


async def test_a_webhook_delivery_whose_message_is_gone_is_a_dead_letter_not_a_silent_success(
    committing_client: httpx.AsyncClient, worker: Worker, hook: RecordingWebhook,  # noqa: F811
    makers: async_sessionmaker[AsyncSession],  # noqa: F811
) -> None:
    """Retention never lets this happen; if something else did, the operator sees it (dead, with the reason)."""
    destination = await webhook_destination(committing_client)
    async with makers.begin() as session:
        gone = await message(session)
        row = await delivery_of(session, destination, gone, "pending")
        await session.execute(text("DELETE FROM outbox_message WHERE id = :id"), {"id": gone})
    await drain(worker)
    async with makers() as session:
        status, error = (await session.execute(text("SELECT status, last_error FROM delivery WHERE id = :id"),
                                               {"id": row})).one()
    assert (status, error) == ("dead", "the outbox message is no longer stored; nothing was sent")
    assert all(m.id != f"msg_{gone}" for m in hook.received)


async def test_a_sweep_vacuums_a_table_past_the_threshold(
    makers: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    """Outside a transaction, without waiting for a lock; here every table counts as due."""
    monkeypatch.setattr(outbox_retention, "VACUUM_THRESHOLD", -1)
    monkeypatch.setattr(outbox_retention, "VACUUM_SCALE", 0)

    async def vacuums() -> dict[str, int]:
        async with makers() as session:
            return dict((await session.execute(text(
                "SELECT relname, vacuum_count FROM pg_stat_user_tables WHERE relname IN ('delivery', 'outbox_message')"
            ))).all())

    before = await vacuums()
    assert await outbox_retention.vacuum_if_due(makers) == ["delivery", "outbox_message"]
    for _ in range(50):  # the statistics are flushed a moment later
        after = await vacuums()
        if all(after[t] > before[t] for t in before):
            break
        await asyncio.sleep(0.1)
    assert all(after[t] > before[t] for t in before), (before, after)
