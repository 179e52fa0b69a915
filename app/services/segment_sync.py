"""Segments as a sync source: who entered and who left a mapped segment, as outbox messages.

A segment is a query, not a list: people enter and leave it with their orders, their events, their consents
and with time alone (`within_days`). So each (destination, segment) mapping keeps a snapshot of the last
answer (`segment_member`), and a periodic job (the worker, every SEGMENT_REFRESH_SECONDS) compares it with
the current answer in ONE statement that inserts who entered, deletes who left and writes a
`segment.entered` / `segment.left` outbox message for each. From there the ordinary pipeline delivers:
vendors get a state push (the consent rule is applied then, app.services.delivery.plan), webhooks the event.

The snapshot is per destination: a destination that maps a segment later sees every current member enter.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import Integer, String, Uuid, cast, delete, func, literal, or_, select, tuple_, union_all
from sqlalchemy import update as update_statement
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import constraint_name
from app.errors import FieldError, InvalidInput
from app.logging import get_logger
from app.models import Contact, Destination, OutboxMessage, Segment, SegmentMember, SegmentSync
from app.models.base import utc_now
from app.services import outbox
from app.services.segments import compile_filter, members_condition
from app.settings import Settings
from app.sync import ids as vendor_ids
from app.timeouts import is_statement_timeout

__all__ = ["Refreshed", "apply_mappings", "carry", "check_mappings", "leave_all", "refresh_next", "restate", "run_next",
           "state"]

_contacts = Contact.__table__  # type: ignore[attr-defined]
_destinations = Destination.__table__  # type: ignore[attr-defined]
_outbox = OutboxMessage.__table__  # type: ignore[attr-defined]
_segments = Segment.__table__  # type: ignore[attr-defined]
_members = SegmentMember.__table__  # type: ignore[attr-defined]
_syncs = SegmentSync.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]
log = get_logger("carnet.segment_sync")

_MEMBER_CONTACT_KEY = "fk_segment_member_contact_id_contact"
_DIFF_ATTEMPTS = 5  # each retry needs yet another merge or erasure committed during the diff


# ---- mappings (destinations service) -----------------------------------------------------------------------


async def check_mappings(
    session: AsyncSession, kind: str, mappings: Sequence[Any], *, list_mappings: Sequence[Mapping[str, Any]]
) -> None:
    """422 naming `segment_mappings[i].<field>` for what this kind of destination cannot sync."""
    # FOR KEY SHARE until the sync rows are written (apply_mappings): a segment found here cannot be deleted before
    # then, and `delete_segment`, waiting for it, sees them (409) instead of leaving the insert a foreign-key error.
    found = set((await session.scalars(
        select(_segments.c.id).where(_segments.c.id.in_([m.segment_id for m in mappings])).order_by(_segments.c.id)
        .with_for_update(read=True, key_share=True)
    )).all()) if mappings else set()
    audiences = {m["remote_list_id"] for m in list_mappings}
    errors = []
    for i, m in enumerate(mappings):
        at = f"segment_mappings[{i}]"
        if m.segment_id not in found:
            errors.append(FieldError(f"{at}.segment_id", "no such segment", "not_found"))
        if kind == "webhook":
            errors += [FieldError(f"{at}.{name}", "a webhook receives segment events; nothing to name here",
                                  "not_allowed") for name in ("remote_list_id", "tag") if getattr(m, name)]
            continue
        if m.remote_list_id is None:
            errors.append(FieldError(f"{at}.remote_list_id", "required for this kind", "missing"))
        elif problem := vendor_ids.list_id_problem(kind, m.remote_list_id):
            errors.append(FieldError(f"{at}.remote_list_id", problem, "invalid"))
        elif kind == "brevo" and m.remote_list_id in audiences:
            errors.append(FieldError(f"{at}.remote_list_id", "this Brevo list is already filled by a Carnet list; "
                                     "a segment needs a list of its own", "conflict"))
        elif kind == "mailchimp" and m.remote_list_id not in audiences:
            errors.append(FieldError(f"{at}.remote_list_id", "not an audience of list_mappings: Mailchimp tags "
                                     "live on the members of a mapped audience", "not_mapped"))
        if kind == "brevo" and m.tag is not None:
            errors.append(FieldError(f"{at}.tag", "Brevo has no tags: the segment fills remote_list_id",
                                     "not_allowed"))
        if kind == "mailchimp" and m.tag is None:
            errors.append(FieldError(f"{at}.tag", "required for Mailchimp: the tag that marks the members",
                                     "missing"))
    if kind == "brevo":
        remote = [m.remote_list_id for m in mappings]
        errors += [FieldError(f"segment_mappings[{i}].remote_list_id", "two segments cannot fill one list",
                              "conflict") for i, r in enumerate(remote) if r is not None and remote.index(r) != i]
    if errors:
        raise InvalidInput(*errors)


async def apply_mappings(
    session: AsyncSession, destination_id: uuid.UUID, segment_ids: Sequence[uuid.UUID],
    *, fresh: Sequence[uuid.UUID] = (),
) -> None:
    """One sync row per mapped segment (due at once); an unmapped segment's snapshot goes, and so does the
    snapshot of a segment sent somewhere else now (`fresh`: its members enter the new list or tag)."""
    await session.execute(delete(_syncs).where(
        _syncs.c.destination_id == destination_id,
        or_(_syncs.c.segment_id.not_in(segment_ids), _syncs.c.segment_id.in_(fresh))))
    if segment_ids:
        await session.execute(insert(_syncs).values([
            {"destination_id": destination_id, "segment_id": s, "refreshed_at": None, "members": 0}
            for s in segment_ids
        ]).on_conflict_do_nothing())


async def state(session: AsyncSession, destination_id: uuid.UUID) -> dict[uuid.UUID, Row]:
    """Per mapped segment: members in the last snapshot and when it was taken (the destination's read model)."""
    rows = await session.execute(select(_syncs).where(_syncs.c.destination_id == destination_id))
    return {r["segment_id"]: r for r in rows.mappings()}


# ---- contacts that go (merge, erasure) ---------------------------------------------------------------------


async def leave_all(
    session: AsyncSession, contact_ids: Sequence[uuid.UUID], *, reason: str, survivor_id: uuid.UUID | None = None,
) -> int:
    """Contacts about to be deleted (merged away, erased) leave every snapshot they are in, with a `segment.left`
    message each, in the caller's transaction and before its `contact.merged` / `contact.erased`: their rows would
    otherwise go by ON DELETE CASCADE and no destination would hear they left (docs/sync.md). Ids only; `reason`
    says why (`merged`, with `survivor_id`; `erased`). How many messages were written."""
    left = (
        delete(_members).where(_members.c.contact_id.in_(contact_ids))
        .returning(_members.c.destination_id, _members.c.segment_id, _members.c.contact_id)
        .cte("left")
    )
    extra: list[Any] = ["reason", literal(reason)]
    if survivor_id is not None:
        extra += ["survivor_id", literal(str(survivor_id))]
    payload = func.jsonb_build_object(
        "segment_id", cast(left.c.segment_id, String), "destination_id", cast(left.c.destination_id, String),
        "contact_id", cast(left.c.contact_id, String), *extra)
    written = await session.execute(
        insert(_outbox).from_select(
            ["topic", "contact_id", "payload", "created_at"],
            select(literal("segment.left"), left.c.contact_id, cast(payload, JSONB), literal(utc_now()))
            .order_by(left.c.contact_id, left.c.destination_id, left.c.segment_id))
        .returning(_outbox.c.id))
    return len(written.all())


# ---- a merge's survivor ------------------------------------------------------------------------------------


async def carry(
    session: AsyncSession, duplicate_id: uuid.UUID, survivor_id: uuid.UUID, destination_ids: Sequence[uuid.UUID],
) -> int:
    """Before `leave_all` of a merge whose survivor took over the duplicate's record at these vendors (its link,
    delivery.hand_over_links): that record is in the duplicate's segment lists (tags) there, so the duplicate's
    places in those snapshots become the survivor's, and `restate` then keeps or takes each out like any of the
    survivor's own. Snapshots a refresh holds are passed by (`_lock`): the record leaves those instead (below). How
    many places moved or left."""
    if not destination_ids:
        return 0
    pairs = await _lock(session, destination_ids=destination_ids)
    held = set(pairs)
    theirs = _members.alias("theirs")
    survivors = ~select(theirs.c.contact_id).where(
        theirs.c.destination_id == _members.c.destination_id, theirs.c.segment_id == _members.c.segment_id,
        theirs.c.contact_id == survivor_id).exists()
    # A snapshot a refresh holds keeps the duplicate's place (moving it could deadlock with that refresh), which goes
    # with the duplicate, and its `segment.left` reaches no record (the link moved): the record would stay in that
    # list or tag for good. It leaves it as the survivor's now, unless the survivor has a place of its own there;
    # the survivor is in no snapshot of it, so a refresh puts it back if it matches (after: it waits for the merge).
    passed = [(d, s) for d, s in (await session.execute(
        select(_members.c.destination_id, _members.c.segment_id).where(
            _members.c.contact_id == duplicate_id, _members.c.destination_id.in_(destination_ids), survivors)
        .order_by(_members.c.destination_id, _members.c.segment_id))).all() if (d, s) not in held]
    await outbox.add_many(session, "segment.left", _merged_messages(passed, survivor_id, duplicate_id))
    if not pairs:
        return len(passed)
    moved = await session.execute(
        update_statement(_members)
        .where(_members.c.contact_id == duplicate_id,
               tuple_(_members.c.destination_id, _members.c.segment_id).in_(pairs), survivors)
        .values(contact_id=survivor_id)
        .returning(_members.c.segment_id))
    return len(moved.all()) + len(passed)


async def restate(session: AsyncSession, contact_id: uuid.UUID, *, merged_id: uuid.UUID, now: datetime) -> int:
    """A merge's survivor, as it is once merged, enters the synced segments it matches and leaves those it no
    longer does, in the merge's transaction, with `segment.entered` / `segment.left` (reason `merged`, `merged_id`):
    its push then states each at the vendors, instead of waiting for the next refresh (or never, for a segment the
    duplicate's record was in: the survivor never entered it). Enabled destinations, as the refresh; a filter that
    no longer compiles is left to its refresh, which reports it. How many messages were written."""
    due = await _lock(session, enabled_only=True)
    if not due:
        return 0
    filters = dict((await session.execute(
        select(_segments.c.id, _segments.c.filter).where(_segments.c.id.in_({s for _d, s in due})))).all())
    conditions = {}
    for segment_id, filter_ in filters.items():
        try:
            conditions[segment_id] = await compile_filter(session, filter_, now=now)
        except InvalidInput:
            continue
    matches: dict[uuid.UUID, bool] = {}
    if conditions:  # whether the contact matches each filter, in one round trip
        answers = (await session.execute(select(*[
            select(_contacts.c.id).where(_contacts.c.id == contact_id, condition).exists()
            for condition in conditions.values()]))).one()
        matches = dict(zip(conditions, map(bool, answers), strict=True))
    held = set((await session.execute(
        select(_members.c.destination_id, _members.c.segment_id).where(_members.c.contact_id == contact_id))).all())
    entering = [(d, s) for d, s in due if matches.get(s) is True and (d, s) not in held]
    leaving = [(d, s) for d, s in due if matches.get(s) is False and (d, s) in held]
    entered: list[tuple[uuid.UUID, uuid.UUID]] = []
    left: list[tuple[uuid.UUID, uuid.UUID]] = []
    if entering:
        entered = [(d, s) for d, s in await session.execute(
            insert(_members).values([{"destination_id": d, "segment_id": s, "contact_id": contact_id, "entered_at": now}
                                     for d, s in entering])
            .on_conflict_do_nothing().returning(_members.c.destination_id, _members.c.segment_id))]
    if leaving:
        left = [(d, s) for d, s in await session.execute(
            delete(_members).where(
                _members.c.contact_id == contact_id,
                tuple_(_members.c.destination_id, _members.c.segment_id).in_(leaving))
            .returning(_members.c.destination_id, _members.c.segment_id))]
    await outbox.add_many(session, "segment.entered", _merged_messages(sorted(entered), contact_id, merged_id))
    await outbox.add_many(session, "segment.left", _merged_messages(sorted(left), contact_id, merged_id))
    return len(entered) + len(left)


def _merged_messages(pairs: Sequence[tuple[uuid.UUID, uuid.UUID]], contact_id: uuid.UUID, merged_id: uuid.UUID
                     ) -> list[tuple[uuid.UUID | None, dict[str, str]]]:
    """The survivor's `segment.*` outbox messages of a merge, one per (destination, segment)."""
    return [(contact_id, {"segment_id": str(s), "destination_id": str(d), "contact_id": str(contact_id),
                          "reason": "merged", "merged_id": str(merged_id)}) for d, s in pairs]


async def _lock(
    session: AsyncSession, *, destination_ids: Sequence[uuid.UUID] | None = None, enabled_only: bool = False,
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(destination, segment) of the snapshots no refresh holds now, locked FOR SHARE until the caller commits:
    no refresh starts on them meanwhile (FOR UPDATE SKIP LOCKED passes them by). One a refresh holds is skipped, not
    waited for: that refresh may itself wait for the merge's contacts (its inserts' foreign keys), a deadlock."""
    query = select(_syncs.c.destination_id, _syncs.c.segment_id)
    if enabled_only:
        query = query.join(_destinations, (_destinations.c.id == _syncs.c.destination_id) & _destinations.c.enabled)
    if destination_ids is not None:
        query = query.where(_syncs.c.destination_id.in_(destination_ids))
    query = query.order_by(_syncs.c.destination_id, _syncs.c.segment_id).with_for_update(
        of=_syncs, read=True, skip_locked=True)
    return [(d, s) for d, s in (await session.execute(query)).all()]


# ---- refresh (worker) ---------------------------------------------------------------------------------------


async def run_next(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> bool:
    """The worker's job: refresh one due snapshot; True if there was one (the worker then asks again at once)."""
    async with sessions.begin() as session:
        done = await refresh_next(session, every_seconds=settings.segment_refresh_seconds)
    if done is not None and done.failed is not None:
        log.warning("segment_sync.refresh_failed", destination_id=str(done.destination_id),
                    segment_id=str(done.segment_id), reason=done.failed)
    elif done is not None:
        log.info("segment_sync.refreshed", destination_id=str(done.destination_id), segment_id=str(done.segment_id),
                 members=done.members, entered=done.entered, left=done.left)
    return done is not None


@dataclass(frozen=True, slots=True)
class Refreshed:
    destination_id: uuid.UUID
    segment_id: uuid.UUID
    members: int
    entered: int
    left: int
    failed: str | None = None  # why the snapshot was left as it was: invalid_filter, statement_timeout


async def refresh_next(
    session: AsyncSession, *, every_seconds: float, now: datetime | None = None
) -> Refreshed | None:
    """Refresh the most overdue snapshot of an enabled destination, if any is due; None when none is.

    The sync row stays locked until the caller commits (SKIP LOCKED: workers refresh different ones), so the
    snapshot, its outbox messages and `refreshed_at` land together or not at all. `now` is the clock the
    filter's time windows are measured against (tests move it).

    A snapshot that cannot be refreshed now (its stored filter no longer compiles: an attribute it names was
    deleted; its diff ran past the statement timeout) is left as it was, with `last_error` and `failed_at` (the
    destination's read model shows them; `refreshed_at` stays the last good refresh), and waits for the next round
    behind the others instead of being taken again at once by every round: the most overdue, it would otherwise
    hold back every other snapshot for good. The next good refresh clears both.
    """
    now = now or utc_now()
    tried = func.greatest(_syncs.c.refreshed_at, _syncs.c.failed_at)  # a failed one waits its turn too (NULLs ignored)
    due = (await session.execute(
        select(_syncs.c.destination_id, _syncs.c.segment_id, _syncs.c.members, _segments.c.filter)
        .join(_destinations, (_destinations.c.id == _syncs.c.destination_id) & _destinations.c.enabled)
        .join(_segments, _segments.c.id == _syncs.c.segment_id)
        .where(or_(tried.is_(None), tried <= now - timedelta(seconds=every_seconds)))
        .order_by(tried.asc().nulls_first())
        .limit(1)
        .with_for_update(of=_syncs, skip_locked=True)
    )).first()
    if due is None:
        return None
    destination_id, segment_id, members, filter_ = due
    failed = None
    try:
        for attempt in range(1, _DIFF_ATTEMPTS + 1):
            try:
                async with session.begin_nested():  # the sync row's lock, taken before, stays held
                    condition = await members_condition(session, filter_, now=now)
                    members, entered, left = (await session.execute(
                        _diff_statement(destination_id, segment_id, condition, now)
                    )).one()
                break
            except IntegrityError as exc:
                # Someone entering was merged away or erased while the diff ran (the statement saw them, their
                # deletion committed before its insert): taken again, it no longer sees them.
                if constraint_name(exc) != _MEMBER_CONTACT_KEY or attempt == _DIFF_ATTEMPTS:
                    raise
    except InvalidInput:
        failed, entered, left = "invalid_filter", 0, 0
    except (DBAPIError, asyncpg.QueryCanceledError) as exc:  # the latter from an EXPLAIN on the driver connection
        if not is_statement_timeout(exc):
            raise
        failed, entered, left = "statement_timeout", 0, 0
    # shown on the destination; a failure leaves refreshed_at as the last good refresh
    outcome: dict[str, Any] = {"refreshed_at": now, "members": members, "last_error": None, "failed_at": None} \
        if failed is None else {"last_error": failed, "failed_at": now}
    await session.execute(
        update_statement(_syncs)
        .where(_syncs.c.destination_id == destination_id, _syncs.c.segment_id == segment_id)
        .values(**outcome)
    )
    return Refreshed(destination_id, segment_id, members, entered, left, failed)


def _diff_statement(destination_id: uuid.UUID, segment_id: uuid.UUID, condition: Any, now: Any) -> Any:
    """ONE statement: the current answer against the snapshot, both changes applied, one message per change.

        WITH current AS (SELECT id FROM contact WHERE <filter>),
             changed AS (SELECT current.id AS entering, snapshot.contact_id AS leaving
                         FROM current FULL JOIN snapshot ON ... WHERE one side IS NULL),
             entered AS (INSERT INTO segment_member ... FROM changed ... ON CONFLICT DO NOTHING RETURNING ...),
             left    AS (DELETE FROM segment_member ... contact_id = ANY(ARRAY(leaving)) RETURNING ...),
             written AS (INSERT INTO outbox_message ... FROM entered UNION ALL ... FROM left RETURNING topic)
        SELECT (SELECT count(*) FROM current), count(entered), count(left) FROM written

    The two answers are compared once, by a FULL JOIN: PostgreSQL runs it as a hash or merge join whatever its
    estimates (a NOT EXISTS over the CTE became a nested loop on an unanalysed snapshot: minutes at 50k
    members), and nobody already in the snapshot is offered to ON CONFLICT (docs/performance.md, "Segments as
    a sync source"). ON CONFLICT DO NOTHING stays for a race with another refresh.
    """
    pair = (_members.c.destination_id == destination_id) & (_members.c.segment_id == segment_id)
    current = select(_contacts.c.id).where(condition).cte("current")
    snapshot = select(_members.c.contact_id).where(pair).subquery("snapshot")
    changed = (
        select(current.c.id.label("entering"), snapshot.c.contact_id.label("leaving"))
        .select_from(current.join(snapshot, snapshot.c.contact_id == current.c.id, full=True))
        .where(or_(current.c.id.is_(None), snapshot.c.contact_id.is_(None)))
        .cte("changed")
    )
    entered = (
        insert(_members)
        .from_select(["destination_id", "segment_id", "contact_id", "entered_at"],
                     select(literal(destination_id, Uuid), literal(segment_id, Uuid), changed.c.entering,
                            literal(now)).where(changed.c.entering.is_not(None)))
        .on_conflict_do_nothing()
        .returning(_members.c.contact_id)
        .cte("entered")
    )
    leaving = select(changed.c.leaving).where(changed.c.leaving.is_not(None))
    left = (
        delete(_members)
        .where(pair, _members.c.contact_id == func.any(func.array(leaving.scalar_subquery())))
        .returning(_members.c.contact_id)
        .cte("left")
    )

    def messages(moved: Any, topic: str) -> Any:
        payload = func.jsonb_build_object(
            "segment_id", literal(str(segment_id)), "destination_id", literal(str(destination_id)),
            "contact_id", cast(moved.c.contact_id, String))
        return select(literal(topic), moved.c.contact_id, cast(payload, JSONB), literal(now))

    written = (
        insert(_outbox)
        .from_select(["topic", "contact_id", "payload", "created_at"],
                     union_all(messages(entered, "segment.entered"), messages(left, "segment.left")))
        .returning(_outbox.c.topic)
        .cte("written")
    )
    return select(
        select(func.count()).select_from(current).scalar_subquery(),
        cast(func.count().filter(written.c.topic == "segment.entered"), Integer),
        cast(func.count().filter(written.c.topic == "segment.left"), Integer),
    ).select_from(written)
