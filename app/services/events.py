"""Behaviour events: one or a batch recorded, a contact's events listed.

Events live in monthly partitions of `event` (app.services.event_partitions). The sender's `event_id` is unique
across them through `event_key`, written in the same statement as the event: `INSERT ... ON CONFLICT DO
NOTHING` on the key decides, so a key seen twice is stored once whatever its `occurred_at`, and two senders
racing with one key are serialized by its unique index (the second waits for the first to commit or roll back).

A batch is stored set-based: items whose contact is named by id or external_id are resolved and locked in one
statement (id order, services/locks.py) and inserted in one; the rest (a contact by email, which may create it;
an id merged away; an unknown contact) go one by one through `record_event`, each in its own savepoint. The batch's
own statements go to the session's asyncpg connection itself (same transaction): its thousand rows skip
SQLAlchemy's parameter and row handling, and the store answers two arrays instead of a thousand rows
(docs/performance.md, "Events": what each change saved, per event).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import ValidationError
from pydantic_core import to_json
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import driver_connection
from app.errors import AppError
from app.models import Event
from app.models.base import utc_now
from app.schemas.orders import EventCreate
from app.security import Principal
from app.services import contacts as contacts_service
from app.services import locks, outbox
from app.services.orders import EVENT_RECORDED, resolve_contact

__all__ = ["Outcome", "Recorded", "contact_events", "record_batch", "record_event"]

_events = Event.__table__  # type: ignore[attr-defined]

# One statement: number the rows, claim their keys, insert the events whose key was free (or who have none).
_STORE = """
    WITH given AS MATERIALIZED (
        SELECT g.*, nextval(pg_get_serial_sequence('event', 'id')) AS id
        FROM unnest(CAST(:ns AS int[]), CAST(:event_ids AS varchar[]), CAST(:contact_ids AS uuid[]),
                    CAST(:types AS varchar[]), CAST(:occurred AS timestamptz[]), CAST(:properties AS text[]))
             AS g(n, event_id, contact_id, type, occurred_at, properties)
    ), keyed AS (
        INSERT INTO event_key (event_id, id, occurred_at)
        SELECT event_id, id, occurred_at FROM given WHERE event_id IS NOT NULL
        ORDER BY event_id  -- two batches sharing keys take them in one order: no deadlock
        ON CONFLICT DO NOTHING RETURNING event_id
    ), stored AS (
        INSERT INTO event (id, event_id, contact_id, type, occurred_at, properties, created_at)
        SELECT id, event_id, contact_id, type, occurred_at, CAST(properties AS jsonb), :now FROM given
        WHERE event_id IS NULL OR event_id IN (SELECT event_id FROM keyed)
        RETURNING *
    )
    SELECT {columns} FROM stored JOIN given USING (id)
"""
_PARAMETERS = ("ns", "event_ids", "contact_ids", "types", "occurred", "properties", "now")  # in $1..$7 order
_STORE_ROWS = text(_STORE.format(columns="given.n, stored.*"))
# the batch's, on the driver: which items were stored, as what id (two arrays: one row to decode, not a thousand)
_STORE_IDS = _STORE.format(columns="array_agg(given.n), array_agg(stored.id)")
for _n, _name in enumerate(_PARAMETERS, 1):
    _STORE_IDS = _STORE_IDS.replace(f":{_name}", f"${_n}")
_KEPT = text("SELECT event_id, id, occurred_at FROM event_key WHERE event_id = ANY(CAST(:event_ids AS varchar[]))")
# Every contact the batch will lock, in one statement in id order (docs/operations.md, "Locking rules"): those named
# by id or external_id, and those holding the keys of the items named by email, which `record_event` resolves one by
# one through the upsert (FOR UPDATE: it may set a key), so in that mode for all when there are any. Locked one by one
# as their items came, two batches naming the same people in another order deadlocked.
_LOCK_KNOWN = """
    SELECT id, external_id FROM contact
    WHERE id = ANY($1::uuid[]) OR external_id = ANY($2::varchar[]) OR email = ANY($3::varchar[])
    ORDER BY id FOR {mode}
"""
_LAST_ACTIVITY = """
    UPDATE contact c SET last_activity_at = greatest(c.last_activity_at, m.at)
    FROM unnest($1::uuid[], $2::timestamptz[]) AS m(id, at)
    WHERE c.id = m.id AND (c.last_activity_at IS NULL OR c.last_activity_at < m.at)  -- no new row version for nothing
"""

# A batch item's outcome: ("created" | "duplicate", event id), or the error that failed it alone.
Outcome = tuple[str, int] | ValidationError | AppError


@dataclass(frozen=True, slots=True)
class Recorded:
    row: dict[str, Any]      # the event stored: this one, or on a replayed event_id the one stored first
    created: bool
    contact_id: uuid.UUID    # the contact this request's reference resolved to (a replay's row may name another)


@dataclass(slots=True)
class _Resolved:
    n: int
    contact_id: uuid.UUID
    event: EventCreate


async def record_event(session: AsyncSession, payload: EventCreate, *, actor: Principal) -> Recorded:
    """Append one event (a replayed event_id returns the stored one); last_activity_at follows."""
    contact_id = await resolve_contact(session, payload.contact, actor=actor, via="api")
    rows = [dict(row) for row in (await session.execute(_STORE_ROWS, _parameters([_Resolved(0, contact_id, payload)])))
            .mappings()]
    if rows:
        await _touch(await driver_connection(session), {contact_id: payload.occurred_at})
        await _announce(session, lambda: [(contact_id, rows[0]["id"], payload.type)])
        return Recorded(_without_n(rows[0]), True, contact_id)
    kept = (await session.execute(_KEPT, {"event_ids": [payload.event_id]})).one()
    stored = await session.execute(
        select(_events).where(_events.c.id == kept.id, _events.c.occurred_at == kept.occurred_at))
    return Recorded(dict(stored.mappings().one()), False, contact_id)


async def record_batch(session: AsyncSession, items: Sequence[Any], *, actor: Principal) -> list[Outcome]:
    """Each item validated and recorded alone in effect (one bad item never sinks the others), the common case
    set-based; outcomes in the items' order."""
    outcomes: list[Outcome | None] = [None] * len(items)
    valid: list[tuple[int, EventCreate]] = []
    validate = EventCreate.__pydantic_validator__.validate_python  # model_validate(item), minus its wrapper per item
    for n, item in enumerate(items):
        try:
            valid.append((n, validate(item)))
        except ValidationError as exc:
            outcomes[n] = exc
    connection = await driver_connection(session)
    resolved, one_by_one = await _resolve_known(connection, valid)
    first_of: dict[str, int] = {}  # event_id -> the item that stores it; later ones are its duplicates
    storing: list[_Resolved] = []
    for r in resolved:
        if r.event.event_id is not None and r.event.event_id in first_of:
            continue
        if r.event.event_id is not None:
            first_of[r.event.event_id] = r.n
        storing.append(r)
    created = await _store_batch(connection, storing)
    latest: dict[uuid.UUID, datetime] = {}
    for r in storing:
        if r.n in created:
            at = latest.get(r.contact_id)
            if at is None or at < r.event.occurred_at:
                latest[r.contact_id] = r.event.occurred_at
    await _touch(connection, latest)
    if created:
        await _announce(session, lambda: [(r.contact_id, created[r.n], r.event.type)
                                          for r in storing if r.n in created])
    kept = await _kept_ids(session, [r.event.event_id for r in resolved if r.event.event_id is not None
                                     and first_of[r.event.event_id] not in created])
    for r in resolved:
        if r.n in created:
            outcomes[r.n] = ("created", created[r.n])
        else:
            event_id = r.event.event_id
            assert event_id is not None  # an event without a key is always created
            stored_id = created.get(first_of[event_id], kept.get(event_id))
            outcomes[r.n] = ("duplicate", stored_id)  # type: ignore[assignment]
    for n, payload in one_by_one:
        outcomes[n] = await _record_alone(session, payload, actor=actor)
    return outcomes  # type: ignore[return-value]


async def contact_events(session: AsyncSession, contact_id: uuid.UUID, *, limit: int,
                         before_id: int | None) -> list[dict[str, Any]]:
    await contacts_service.get(session, contact_id)
    query = select(_events).where(_events.c.contact_id == contact_id)
    if before_id is not None:
        query = query.where(_events.c.id < before_id)
    rows = await session.execute(query.order_by(_events.c.id.desc()).limit(limit + 1))
    return [dict(r) for r in rows.mappings()]


async def _resolve_known(
    connection: asyncpg.Connection, valid: list[tuple[int, EventCreate]]
) -> tuple[list[_Resolved], list[tuple[int, EventCreate]]]:
    """Every contact the items name locked in one statement (`_LOCK_KNOWN`); items naming an existing contact by id,
    or by external_id alone, resolved here, the others for `record_event` one by one."""
    by_id = {e.contact.id for _, e in valid if e.contact.id is not None}
    by_external = {e.contact.external_id for _, e in valid
                   if e.contact.id is None and e.contact.email is None and e.contact.external_id is not None}
    by_email = [e.contact for _, e in valid if e.contact.id is None and e.contact.email is not None]
    emails = {ref.email for ref in by_email}
    keyed = by_external | {ref.external_id for ref in by_email if ref.external_id is not None}
    found: set[uuid.UUID] = set()
    holders: dict[str, uuid.UUID] = {}
    if by_id or keyed or emails:
        # the items by email may create their contacts, one by one: the buckets of those new keys first
        await locks.lock_new_keys(connection, emails=sorted(emails), external_ids=sorted(
            {ref.external_id for ref in by_email if ref.external_id is not None}))
        lock = _LOCK_KNOWN.format(mode="UPDATE" if emails else "NO KEY UPDATE")
        for contact_id, external_id in await connection.fetch(lock, list(by_id), sorted(keyed), sorted(emails)):
            found.add(contact_id)
            if external_id is not None:
                holders[external_id] = contact_id
    resolved: list[_Resolved] = []
    one_by_one: list[tuple[int, EventCreate]] = []
    for n, event in valid:
        ref = event.contact
        if ref.id is not None:
            contact_id = ref.id if ref.id in found else None
        elif ref.email is None and ref.external_id is not None:
            contact_id = holders.get(ref.external_id)
        else:
            contact_id = None
        if contact_id is None:
            one_by_one.append((n, event))
        else:
            resolved.append(_Resolved(n, contact_id, event))
    return resolved, one_by_one


async def _record_alone(session: AsyncSession, payload: EventCreate, *, actor: Principal) -> Outcome:
    try:
        async with session.begin_nested():
            done = await record_event(session, payload, actor=actor)
    except (ValidationError, AppError) as exc:
        return exc
    return ("created" if done.created else "duplicate"), done.row["id"]


async def _store_batch(connection: asyncpg.Connection, rows: list[_Resolved]) -> dict[int, int]:
    """Insert these events (keys first): item number `n` -> event id, for those actually stored."""
    if not rows:
        return {}
    parameters = _parameters(rows)
    ns, ids = await connection.fetchrow(_STORE_IDS, *(parameters[name] for name in _PARAMETERS))
    return dict(zip(ns, ids, strict=True)) if ns is not None else {}  # array_agg of no rows is NULL


def _parameters(rows: list[_Resolved]) -> dict[str, Any]:
    """The store's parameters: one array a column. Properties as JSON text by pydantic-core (a tenth of
    json.dumps' time; the same JSON once stored as jsonb)."""
    return {
        "ns": [r.n for r in rows], "event_ids": [r.event.event_id for r in rows],
        "contact_ids": [r.contact_id for r in rows], "types": [r.event.type for r in rows],
        "occurred": [r.event.occurred_at for r in rows],
        "properties": [to_json(r.event.properties).decode() for r in rows], "now": utc_now(),
    }


# The emailing tools that push behaviour events (`push_events`) learn of new ones through the outbox; without such
# a destination, nothing is written (events are the high-volume path: docs/performance.md "Events").
_PUSHES_EVENTS = text("""
    SELECT EXISTS (SELECT 1 FROM destination
                   WHERE jsonb_typeof(config -> 'push_events') = 'array'
                     AND jsonb_array_length(config -> 'push_events') > 0)
""")


async def _announce(session: AsyncSession, created: Callable[[], list[tuple[uuid.UUID, int, str]]]) -> None:
    """The events `created()` lists (contact, event id, type), to the outbox; listed only when someone pushes them."""
    if await session.scalar(_PUSHES_EVENTS):
        await outbox.add_many(session, EVENT_RECORDED, [(contact_id, {"id": event_id, "type": type_})
                                                        for contact_id, event_id, type_ in created()])


async def _touch(connection: asyncpg.Connection, latest: dict[uuid.UUID, datetime]) -> None:
    """last_activity_at follows the newest event recorded for each contact."""
    if latest:
        await connection.execute(_LAST_ACTIVITY, list(latest), list(latest.values()))


async def _kept_ids(session: AsyncSession, event_ids: list[str]) -> dict[str, int]:
    if not event_ids:
        return {}
    return {row.event_id: row.id for row in await session.execute(_KEPT, {"event_ids": event_ids})}


def _without_n(row: dict[str, Any]) -> dict[str, Any]:
    row.pop("n")
    return row
