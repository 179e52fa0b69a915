"""The delivery pipeline the worker runs: dispatch outbox messages, claim deliveries, complete them.

Three steps, each its own short transaction so no vendor call ever happens inside one:

1. `dispatch`: undispatched outbox messages (SKIP LOCKED) become deliveries for every enabled destination
   that cares — one coalescing "push this contact's state" row per contact for vendors, one row per message
   for webhooks. An erasure (and a merge) also goes to disabled destinations, where it waits to be claimed
   once the destination is enabled again: a person erased while a destination was paused still leaves it.
2. `claim`: a batch of due deliveries of one destination goes `in_flight` under a lease (SKIP LOCKED, head of
   line per contact, so two workers never hold the same contact's deliveries at once).
3. `complete`: outcomes are written back — delivered, rescheduled with backoff, or dead after the last try —
   but only while the lease is still ours (a worker that lost its lease writes nothing).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.base import utc_now
from app.services import commerce as commerce_service
from app.services.contacts import ADDRESS
from app.services.links import LinkBuilder
from app.services.locks import survivor_of
from app.services.segments import GRANTING
from app.sync.base import ContactState, Erasure, EventMessage, MemberStatus

__all__ = [
    "Backoff",
    "Claimed",
    "Completion",
    "Plan",
    "Ref",
    "claim",
    "complete",
    "dispatch",
    "enabled_destination_ids",
    "erasures_owed",
    "event_messages",
    "forget_refs",
    "hand_over_links",
    "heartbeat",
    "plan",
    "reap_expired_leases",
    "record_health",
    "remember_links",
    "remember_tags",
    "retire_refs",
    "sign_off",
]

Row = Mapping[str, Any]
Ref = tuple[uuid.UUID, str]    # (contact id, remote reference): a sync_link or sync_retired_ref row of a destination
DISPATCH_BATCH = 1000
PREFERENCES_FIELD = "preferences_url"  # a field_mappings source: the signed preference center link
DISPATCH_LOCK = 0x6361726E6574_01  # pg advisory lock key: "carnet" + 1


@dataclass(frozen=True, slots=True)
class Backoff:
    base_seconds: float
    cap_seconds: float
    max_attempts: int

    def delay(self, attempts: int) -> float:
        """Exponential with full jitter (the thundering herd of a recovering vendor is spread out)."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** max(attempts - 1, 0))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not security)


# ---- worker processes ------------------------------------------------------------------------------------

_HEARTBEAT = text("""
WITH beat AS (
    INSERT INTO worker_heartbeat (worker_id, seen_at) VALUES (:worker, now())
    ON CONFLICT (worker_id) DO UPDATE SET seen_at = excluded.seen_at
), long_gone AS (
    DELETE FROM worker_heartbeat WHERE seen_at < now() - interval '1 day'
)
SELECT 1 + count(*) FROM worker_heartbeat WHERE worker_id <> :worker AND seen_at > now() - make_interval(secs => :live)
""")


async def heartbeat(session: AsyncSession, worker_id: str, *, live_seconds: float) -> int:
    """Say this worker is alive; returns how many workers are (itself included)."""
    return int(await session.scalar(_HEARTBEAT, {"worker": worker_id, "live": live_seconds}) or 1)


async def sign_off(session: AsyncSession, worker_id: str) -> None:
    """A clean stop: the others take this worker's share at their next heartbeat."""
    await session.execute(text("DELETE FROM worker_heartbeat WHERE worker_id = :worker"), {"worker": worker_id})


async def enabled_destination_ids(session: AsyncSession) -> list[uuid.UUID]:
    return list((await session.scalars(text("SELECT id FROM destination WHERE enabled ORDER BY name"))).all())


# ---- 1. dispatch ----------------------------------------------------------------------------------------

# Vendors: a contact matters when it is in a mapped list, in a synced segment's snapshot, or was pushed before
# (its link must follow it). Segment messages go only to the destination whose snapshot they come from.
# A delivery remembers which lists (`<list id>`) and segments (`segment:<id>`) changed, and whether anything
# else did (`profile_changed`). Commerce messages (commerce.*) go where their option is on, for a contact the
# destination syncs anyway, and change no profile: the push reads the orders, carts and events owed
# (app/services/commerce.py).
# An erasure or a merge goes to every vendor destination, enabled or not (a disabled one claims nothing: the row
# waits), that may hold something of the person: a link, a retired record or a commerce record (a store's customer,
# order or cart, even with no member left) of theirs or of anyone merged into them, or any delivery at all (a first
# push still in flight makes its link after this message).
_DISPATCH_VENDORS = text("""
INSERT INTO delivery (destination_id, contact_id, message_id, topic, coalesces, profile_changed, changed_lists,
                      status, attempts, next_attempt_at, created_at, updated_at)
SELECT d.id, m.contact_id, max(m.id), (array_agg(m.topic ORDER BY m.id DESC))[1], true,
       bool_or(m.topic NOT LIKE 'membership.%' AND m.topic NOT LIKE 'segment.%' AND m.topic NOT LIKE 'commerce.%'),
       coalesce(array_agg(DISTINCT CASE WHEN m.topic LIKE 'segment.%' THEN 'segment:' || (m.payload ->> 'segment_id')
                                        ELSE m.payload ->> 'list_id' END)
                FILTER (WHERE m.topic LIKE 'membership.%' OR m.topic LIKE 'segment.%'), '{}'),
       'pending', 0, :now, :now, :now
FROM outbox_message m
JOIN destination d ON d.kind <> 'webhook' AND (d.enabled OR m.topic IN ('contact.erased', 'contact.merged'))
WHERE m.id = ANY(:ids) AND m.contact_id IS NOT NULL
  AND CASE WHEN m.topic LIKE 'segment.%' THEN m.payload ->> 'destination_id' = d.id::text
      WHEN m.topic IN ('contact.erased', 'contact.merged') THEN
           EXISTS (SELECT 1 FROM delivery x WHERE x.destination_id = d.id AND x.contact_id = m.contact_id)
           OR EXISTS (WITH RECURSIVE people(id) AS (
                          SELECT m.contact_id
                          UNION
                          SELECT cm.merged_id FROM contact_merge cm JOIN people p ON cm.survivor_id = p.id)
                      SELECT 1 FROM people p
                      WHERE EXISTS (SELECT 1 FROM sync_link l WHERE l.destination_id = d.id AND l.contact_id = p.id)
                         OR EXISTS (SELECT 1 FROM sync_retired_ref r
                                    WHERE r.destination_id = d.id AND r.contact_id = p.id)
                         OR EXISTS (SELECT 1 FROM sync_commerce s
                                    WHERE s.destination_id = d.id AND s.contact_id = p.id))
      ELSE CASE m.topic WHEN 'commerce.order_changed' THEN coalesce((d.config ->> 'push_orders')::boolean, false)
                        WHEN 'commerce.cart_changed' THEN coalesce((d.config ->> 'push_carts')::boolean, false)
                        WHEN 'commerce.event_recorded' THEN coalesce(d.config -> 'push_events' ? (m.payload ->> 'type'),
                                                                     false)
                        ELSE true END
       AND (EXISTS (SELECT 1 FROM list_membership lm
                    WHERE lm.contact_id = m.contact_id
                      AND lm.list_id::text IN (SELECT jsonb_array_elements(d.list_mappings) ->> 'list_id'))
            OR EXISTS (SELECT 1 FROM segment_member sm WHERE sm.destination_id = d.id AND sm.contact_id = m.contact_id)
            OR EXISTS (SELECT 1 FROM sync_link l WHERE l.destination_id = d.id AND l.contact_id = m.contact_id))
      END
GROUP BY d.id, m.contact_id
ON CONFLICT (destination_id, contact_id) WHERE status = 'pending' AND coalesces
DO UPDATE SET message_id = GREATEST(delivery.message_id, excluded.message_id),
              topic = CASE WHEN excluded.message_id > delivery.message_id THEN excluded.topic ELSE delivery.topic END,
              profile_changed = delivery.profile_changed OR excluded.profile_changed,
              changed_lists = ARRAY(SELECT DISTINCT unnest(delivery.changed_lists || excluded.changed_lists)),
              updated_at = excluded.updated_at
""")

# Webhooks: every message its topics filter lets through (commerce.* only when named: the shop sent them itself);
# `contact.erased` to a disabled receiver too (it waits there, so that a receiver paused at the time still hears of
# the erasure once it is enabled again).
_DISPATCH_WEBHOOKS = text("""
INSERT INTO delivery (destination_id, contact_id, message_id, topic, coalesces, profile_changed, changed_lists,
                      status, attempts, next_attempt_at, created_at, updated_at)
SELECT d.id, m.contact_id, m.id, m.topic, false, true, '{}', 'pending', 0, :now, :now, :now
FROM outbox_message m
JOIN destination d ON d.kind = 'webhook' AND (d.enabled OR m.topic = 'contact.erased')
WHERE m.id = ANY(:ids)
  AND (d.config -> 'topics' ? m.topic OR (d.config -> 'topics' IS NULL AND m.topic NOT LIKE 'commerce.%'))
  AND (m.topic NOT LIKE 'segment.%' OR m.payload ->> 'destination_id' = d.id::text)
ORDER BY m.id
""")


async def dispatch(session: AsyncSession, *, batch: int = DISPATCH_BATCH) -> int:
    """Turn undispatched outbox messages into deliveries; returns how many messages were dispatched.

    Messages of transactions still open are invisible here and dispatched by a later round; SKIP LOCKED
    lets several workers dispatch side by side.
    """
    # One dispatcher at a time: two in parallel would each take a slice of the backlog, and a later message
    # could become a claimable delivery before an earlier one of the same contact exists at all.
    if not await session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": DISPATCH_LOCK}):
        return 0
    ids = list((await session.scalars(
        text("SELECT id FROM outbox_message WHERE dispatched_at IS NULL ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"),
        {"n": batch},
    )).all())
    if not ids:
        return 0
    now = utc_now()
    await session.execute(_DISPATCH_VENDORS, {"ids": ids, "now": now})
    await session.execute(_DISPATCH_WEBHOOKS, {"ids": ids, "now": now})
    await session.execute(text("UPDATE outbox_message SET dispatched_at = :now WHERE id = ANY(:ids)"),
                          {"ids": ids, "now": now})
    return len(ids)


async def analyze(session: AsyncSession) -> None:
    """Fresh planner statistics for `delivery` after a dispatch burst: it can grow by 100,000 pending rows in seconds,
    long before autovacuum notices, and a claim planned on the old numbers reads every pending row instead of
    walking its index. A user that does not own the table gets PostgreSQL's warning and no analyze (checked):
    autovacuum does it, later."""
    await session.execute(text("ANALYZE delivery"))


# ---- 2. claim -------------------------------------------------------------------------------------------

# The pending push that absorbs an expired one takes over what it was about (its lists' explicit statuses, its profile
# change), as `_ABSORB_NEWER` does for a push that goes back to pending.
_REAP_COALESCED = text("""
WITH lost AS (
    DELETE FROM delivery e
    WHERE e.status = 'in_flight' AND e.lease_until < :now AND e.coalesces
      AND EXISTS (SELECT 1 FROM delivery p WHERE p.destination_id = e.destination_id AND p.contact_id = e.contact_id
                  AND p.status = 'pending' AND p.coalesces)
    RETURNING e.destination_id, e.contact_id, e.profile_changed, e.changed_lists
)
UPDATE delivery p SET profile_changed = p.profile_changed OR lost.profile_changed,
                      changed_lists = ARRAY(SELECT DISTINCT unnest(p.changed_lists || lost.changed_lists)),
                      updated_at = :now
FROM lost
WHERE p.destination_id = lost.destination_id AND p.contact_id = lost.contact_id AND p.status = 'pending'
  AND p.coalesces
""")
_REAP = text("""
UPDATE delivery SET status = 'pending', lease_until = NULL, updated_at = :now
WHERE status = 'in_flight' AND lease_until < :now
""")


async def reap_expired_leases(session: AsyncSession) -> int:
    """In-flight rows of a worker that died go back to pending (a newer pending push absorbs a coalesced one)."""
    now = utc_now()
    await session.execute(_REAP_COALESCED, {"now": now})
    return (await session.execute(_REAP, {"now": now})).rowcount or 0


# The oldest due deliveries of a destination, each the head of its contact's line (per-contact order is the
# NOT EXISTS). Ordered by (next_attempt_at, id), the order of ix_delivery_claim, so PostgreSQL walks that index
# and stops after `limit` heads: 13 ms on 200k pending against 370 ms when the order (message_id) forced it to
# read, anti-join and sort every pending row first (docs/performance.md, "Drain"). Ids follow dispatch order.
_CLAIM = text("""
WITH candidates AS (
    SELECT d.id FROM delivery d
    WHERE d.destination_id = :destination_id AND d.status = 'pending' AND d.next_attempt_at <= :now
      AND NOT EXISTS (
          SELECT 1 FROM delivery e
          WHERE e.destination_id = d.destination_id AND e.contact_id = d.contact_id AND e.id <> d.id
            AND (e.status = 'in_flight' OR (e.status = 'pending' AND e.message_id < d.message_id)))
    ORDER BY d.next_attempt_at, d.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE delivery SET status = 'in_flight', lease_until = :lease_until, attempts = delivery.attempts + 1,
                    updated_at = :now
FROM candidates WHERE delivery.id = candidates.id
RETURNING delivery.id, delivery.contact_id, delivery.message_id, delivery.topic, delivery.coalesces,
          delivery.profile_changed, delivery.changed_lists, delivery.attempts, delivery.lease_until
""")


@dataclass(frozen=True, slots=True)
class Claimed:
    destination_id: uuid.UUID
    lease_until: datetime
    rows: list[Row]


async def claim(session: AsyncSession, destination_id: uuid.UUID, *, limit: int, lease_seconds: float) -> Claimed:
    now = utc_now()
    lease_until = now + timedelta(seconds=lease_seconds)
    rows = list((await session.execute(_CLAIM, {
        "destination_id": destination_id, "now": now, "lease_until": lease_until, "limit": limit,
    })).mappings())
    return Claimed(destination_id, lease_until, sorted(rows, key=lambda r: r["id"]))


# ---- what to send ---------------------------------------------------------------------------------------

_STATE_QUERY = text("""
SELECT c.*,
       (SELECT e.action FROM consent_event e
        WHERE e.contact_id = c.id AND e.purpose = 'email_marketing'
        ORDER BY e.occurred_at DESC, e.id DESC LIMIT 1) AS marketing_action
FROM contact c WHERE c.id = ANY(:ids)
""")


def _field_value(contact: Mapping[str, Any], path: str, urls: LinkBuilder | None) -> Any:
    if path == PREFERENCES_FIELD:  # the person's preference center, for the vendor's templates
        return urls.preferences_url(contact["id"]) if urls is not None else None
    if path.startswith("attributes."):
        value = (contact["attributes"] or {}).get(path.removeprefix("attributes."))
    elif path.startswith("address."):
        value = contact[ADDRESS[path.removeprefix("address.")]]
    elif path.startswith("stats."):
        value = contact[path.removeprefix("stats.")]
    else:
        value = contact[path]
    # A Decimal (money stats) stays one: each adapter writes it as its vendor takes numbers (Brevo ignores a text
    # in a number attribute; Mailchimp merge fields take it as text).
    if isinstance(value, date | datetime):
        return value.isoformat()
    return value


@dataclass(slots=True)
class Plan:
    """What a vendor batch must do, per claimed contact."""

    states: list[ContactState] = field(default_factory=list)    # push
    erasures: list[Erasure] = field(default_factory=list)        # delete (or archive: merged away) at the vendor
    nothing: list[uuid.UUID] = field(default_factory=list)       # no email / no mapped list and never pushed
    vanished: list[uuid.UUID] = field(default_factory=list)      # gone, nothing left to send: forget its refs now
    # Per claimed contact, the rows (link or retired record: contact, ref) its erasure settles: forgotten once the
    # vendor confirmed (for `vanished`: at once). Exactly these, not "all of the contact's": a record retired
    # meanwhile was not deleted by this batch and must stay known.
    forget: dict[uuid.UUID, list[Ref]] = field(default_factory=dict)
    # Per erased contact, the contacts (it, those merged into it) whose commerce records its erasure deletes: their
    # sync_commerce rows go once the vendor confirmed.
    sold: dict[uuid.UUID, list[uuid.UUID]] = field(default_factory=dict)


async def plan(session: AsyncSession, destination: Row, rows: Sequence[Row], *,
               urls: LinkBuilder | None = None) -> Plan:
    """Carnet's view of each claimed contact, translated through the destination's mappings.

    A contact that is gone was erased or merged away; what to do follows from the facts, not from the topic of
    the delivery (a resync or a retried one for a gone contact is handled the same way):
    - merged into someone still there: its address retired by that merge (`contact.merged`): its record is
      archived (Mailchimp) or deleted (Brevo); taken over by the survivor: its link is forgotten (the survivor's
      push carries the record on); any other delivery: nothing (its link stays for the person's erasure);
    - otherwise (erased, or merged into someone since erased): every record of the person at this vendor is
      deleted permanently, theirs and those of every contact merged into them (links and retired records, and the
      store's carts, orders and customers: these even when no member of theirs is left to delete).
    A record another contact still in Carnet now holds (its address came back) is never moved nor deleted.
    """
    ids = [r["contact_id"] for r in rows]
    topic = {r["contact_id"]: r["topic"] for r in rows}
    profile_changed = {r["contact_id"]: r["profile_changed"] for r in rows}
    changed_lists = {r["contact_id"]: r["changed_lists"] for r in rows}
    mappings = {m["list_id"]: m for m in destination["list_mappings"]}
    contacts = {c["id"]: c for c in (await session.execute(_STATE_QUERY, {"ids": ids})).mappings()}
    members: dict[uuid.UUID, dict[str, str]] = {}
    for m in (await session.execute(
        text("SELECT contact_id, list_id::text AS list_id, status FROM list_membership "
             "WHERE contact_id = ANY(:ids) AND list_id::text = ANY(:lists)"),
        {"ids": ids, "lists": list(mappings)},
    )).mappings():
        members.setdefault(m["contact_id"], {})[m["list_id"]] = m["status"]
    in_segments: dict[uuid.UUID, set[str]] = {}
    if destination["segment_mappings"]:
        for contact_id, segment_id in (await session.execute(
            text("SELECT contact_id, segment_id::text FROM segment_member WHERE destination_id = :d "
                 "AND contact_id = ANY(:ids)"), {"d": destination["id"], "ids": ids},
        )).all():
            in_segments.setdefault(contact_id, set()).add(segment_id)
    links = {link.contact_id: link for link in (await session.execute(
        text("SELECT contact_id, remote_ref, tags FROM sync_link WHERE destination_id = :d AND contact_id = ANY(:ids)"),
        {"d": destination["id"], "ids": ids},
    )).all()}
    out = Plan()
    gone = [c for c in ids if c not in contacts]
    erased, merged = await _fates(session, gone) if gone else (set(), set())
    records = await _records(session, destination["id"], sorted(erased)) if erased else {}
    held = await _held(session, destination["id"], [link.remote_ref for link in links.values()]
                       + [ref for refs in records.values() for _owner, ref in refs])
    retired = await _retired_addresses(session, destination["id"], [c for c in merged if c in links])
    # The commerce records (Mailchimp carts, orders, customer) of erased people and of those merged into them.
    sold = await commerce_service.held(session, destination["id"], sorted(erased)) if erased else {}
    may_market: dict[uuid.UUID, bool] = {}
    for contact_id in gone:
        link = links.get(contact_id)
        if contact_id in erased:
            owned = records.get(contact_id, [])
            refs = [ref for _owner, ref in owned if not held.get(ref, set())]
            out.forget[contact_id] = owned
            commerce = sold.get(contact_id)
            if commerce is not None:
                out.sold[contact_id] = list(commerce.owners)
            if refs or commerce is not None:  # their store records go even when no member of theirs is left
                out.erasures.append(Erasure(contact_id, refs[0] if refs else None,
                                            other_refs=tuple(dict.fromkeys(refs[1:])),
                                            commerce=commerce.records if commerce else ()))
            else:
                out.vanished.append(contact_id)
        elif link is not None and (topic[contact_id] == "contact.merged" or contact_id in retired):
            # The merge's own delivery, or a later one (a resync, a retry) while its archive is still owed.
            out.forget[contact_id] = [(contact_id, link.remote_ref)]
            if contact_id in retired and not held.get(link.remote_ref, set()):
                out.erasures.append(Erasure(contact_id, link.remote_ref, archive=True))
            else:
                out.vanished.append(contact_id)
        else:
            out.nothing.append(contact_id)
    for contact_id in ids:
        contact = contacts.get(contact_id)
        if contact is None:
            continue
        link = links.get(contact_id)
        # A record another contact holds now is not this one's any more: pushed anew (never renamed from under it).
        ref = link.remote_ref if link and not held.get(link.remote_ref, set()) - {contact_id} else None
        blocked = contact["email_status"] in ("bounced", "complained") or contact["marketing_action"] == "withdrawn"
        may_market[contact_id] = not blocked and contact["marketing_action"] in GRANTING
        lists = _wanted_lists(members.get(contact_id, {}), mappings)
        segments = _wanted_segments(
            destination["segment_mappings"], in_segments.get(contact_id, set()), changed_lists[contact_id],
            may_market=may_market[contact_id], pushed_before=ref is not None)
        segment_tags: dict[str, dict[str, bool]] = {}
        for mapping, wanted in segments:
            if destination["kind"] == "mailchimp":
                segment_tags.setdefault(mapping["remote_list_id"], {})[mapping["tag"]] = wanted
            else:
                lists[mapping["remote_list_id"]] = "subscribed" if wanted else "unsubscribed"
        if contact["email"] is None and ref is not None:
            # Its address removed in Carnet (a link is only made by a push with one): the vendor's record of it goes,
            # as one whose address a merge retired does (archived and retired at Mailchimp, deleted at Brevo);
            # a new address later is pushed as a new record.
            out.forget[contact_id] = [(contact_id, ref)]
            out.erasures.append(Erasure(contact_id, ref, archive=True))
            continue
        if contact["email"] is None or (not lists and ref is None):
            out.nothing.append(contact_id)
            continue
        out.states.append(ContactState(
            contact_id=contact_id,
            email=contact["email"],
            fields={remote: _field_value(contact, local, urls)
                    for local, remote in destination["field_mappings"].items()},
            lists=lists,
            tags=tuple(contact["tags"] or ()),
            removed_tags=tuple(sorted(set(link.tags or ()) - set(contact["tags"] or ()))) if link else (),
            marketing_blocked=blocked,
            remote_ref=ref,
            profile_changed=ref is None or profile_changed[contact_id],
            # First push: everything is news. Later: only the lists whose membership changed in Carnet.
            status_changed=None if ref is None else frozenset(
                mappings[c]["remote_list_id"] for c in changed_lists[contact_id] if c in mappings),
            vendor_double_opt_in=frozenset(m["remote_list_id"] for m in mappings.values() if m.get("double_opt_in")),
            segment_tags=segment_tags,
        ))
    out.states = await commerce_service.attach(session, destination, out.states, may_market)
    return out


# For contacts that are gone: which were merged into someone still in Carnet (the end of the chain of merges).
_FATES = text(commerce_service.MERGE_CHAINS + """
SELECT DISTINCT ON (start) start, EXISTS (SELECT 1 FROM contact c WHERE c.id = chain.id) AS alive
FROM chain ORDER BY start, depth DESC
""")  # noqa: S608 (constant SQL: no value is formatted in)


async def _fates(session: AsyncSession, gone: Sequence[uuid.UUID]) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """(erased, merged into someone still there): gone contacts never merged, or merged into an erased person,
    are erased."""
    alive = {start for start, is_alive in (await session.execute(_FATES, {"ids": list(gone)})).all() if is_alive}
    return set(gone) - alive, alive


# Every record of a person at one destination: links and retired records of the person and of everyone merged
# into them (merges of merges included).
_RECORDS = text(commerce_service.MERGED_PEOPLE + """
SELECT p.root, l.contact_id, l.remote_ref FROM people p
JOIN sync_link l ON l.destination_id = :d AND l.contact_id = p.id
UNION ALL
SELECT p.root, r.contact_id, r.remote_ref FROM people p
JOIN sync_retired_ref r ON r.destination_id = :d AND r.contact_id = p.id
""")


async def _records(session: AsyncSession, destination_id: uuid.UUID, ids: Sequence[uuid.UUID]
                   ) -> dict[uuid.UUID, list[Ref]]:
    found: dict[uuid.UUID, list[Ref]] = {}
    for root, owner, ref in (await session.execute(_RECORDS, {"d": destination_id, "ids": list(ids)})).all():
        found.setdefault(root, []).append((owner, ref))
    return found


async def _held(session: AsyncSession, destination_id: uuid.UUID, refs: Sequence[str]) -> dict[str, set[uuid.UUID]]:
    """Which contacts still in Carnet hold each of these remote records (by their link)."""
    if not refs:
        return {}
    held: dict[str, set[uuid.UUID]] = {}
    for ref, contact_id in (await session.execute(
        text("SELECT l.remote_ref, l.contact_id FROM sync_link l JOIN contact c ON c.id = l.contact_id "
             "WHERE l.destination_id = :d AND l.remote_ref = ANY(:refs)"),
        {"d": destination_id, "refs": sorted(set(refs))},
    )).all():
        held.setdefault(ref, set()).add(contact_id)
    return held


async def _retired_addresses(session: AsyncSession, destination_id: uuid.UUID, merged: Sequence[uuid.UUID]
                             ) -> set[uuid.UUID]:
    """Contacts merged away whose address the survivor did not keep (their remote record must go): read from the
    `contact.merged` message of any delivery of theirs at this destination, not only the one being sent, so that a
    resync or a retry after the merge's own delivery ended dead still archives the record (its link is forgotten
    once the vendor confirmed, so a contact still linked is one whose archive is owed)."""
    if not merged:
        return set()
    found = await session.execute(text("""
        SELECT DISTINCT d.contact_id FROM delivery d JOIN outbox_message m ON m.id = d.message_id
        WHERE d.destination_id = :d AND d.contact_id = ANY(:ids) AND m.topic = 'contact.merged'
          AND (m.payload ->> 'address_retired')::boolean
    """), {"d": destination_id, "ids": list(merged)})
    return set(found.scalars())


def _wanted_segments(
    segment_mappings: Sequence[Row], in_segments: set[str], changed: Sequence[str], *, may_market: bool,
    pushed_before: bool,
) -> list[tuple[Row, bool]]:
    """(mapping, in it at the vendor?) for the synced segments this push must state.

    The consent rule: a segment never decides that someone may receive marketing. Only a member whose latest
    email_marketing consent is a grant, with a deliverable address, is put in the segment's list (or tagged);
    a member without it, or someone who left, is taken out, if the vendor ever heard of them.
    """
    out = []
    for mapping in segment_mappings:
        segment_id = mapping["segment_id"]
        member = segment_id in in_segments
        if member and may_market:
            out.append((mapping, True))
        elif pushed_before and (member or f"segment:{segment_id}" in changed):
            out.append((mapping, False))
    return out


def _wanted_lists(statuses: Mapping[str, str], mappings: Mapping[str, Row]) -> dict[str, MemberStatus]:
    """Carnet membership → remote status. Pending stays local unless the vendor runs the double opt-in."""
    wanted: dict[str, MemberStatus] = {}
    for list_id, status in statuses.items():
        mapping = mappings[list_id]
        if status == "pending":
            if mapping.get("double_opt_in"):
                wanted[mapping["remote_list_id"]] = "pending"
        elif status in ("subscribed", "unsubscribed"):
            wanted[mapping["remote_list_id"]] = status  # type: ignore[assignment]
    return wanted


async def event_messages(
    session: AsyncSession, rows: Sequence[Row], *, links: LinkBuilder | None = None
) -> dict[int, EventMessage]:
    """The messages as webhooks receive them. A message about a contact carries the person's `preferences_url`
    (made at send time from the key, never stored), so the shop's own emails can include it; not an erasure (nor a
    `segment.left` it wrote)."""
    found = await session.execute(
        text("SELECT id, topic, contact_id, payload, created_at FROM outbox_message WHERE id = ANY(:ids)"),
        {"ids": [r["message_id"] for r in rows]},
    )
    return {m["id"]: EventMessage(id=f"msg_{m['id']}", topic=m["topic"], created_at=m["created_at"].isoformat(),
                                  payload=_with_preferences(m, links)) for m in found.mappings()}


def _with_preferences(message: Row, links: LinkBuilder | None) -> Mapping[str, Any]:
    if links is None or message["contact_id"] is None or message["topic"] == "contact.erased" \
            or message["payload"].get("reason") == "erased":  # a segment.left of an erased person: nobody to link to
        return message["payload"]  # type: ignore[no-any-return]
    return {**message["payload"], "preferences_url": links.preferences_url(message["contact_id"])}


# ---- 3. complete ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Completion:
    """What happened to each claimed row (by delivery id)."""

    delivered: list[int]
    dead: dict[int, str]                 # id -> reason
    retry: dict[int, str]                # id -> reason (backoff from attempts)
    retry_after: float | None = None     # the vendor said when (429): overrides the backoff for `retry`
    deferred: list[int] = field(default_factory=list)  # not tried (no time left in the lease): due again now


_DELIVERED = text("""
UPDATE delivery SET status = 'delivered', delivered_at = :now, lease_until = NULL, last_error = NULL,
                    updated_at = :now
WHERE id = ANY(:ids) AND status = 'in_flight' AND lease_until = :lease
""")
_DEFERRED = text("""
UPDATE delivery SET status = 'pending', lease_until = NULL, attempts = attempts - 1, next_attempt_at = :now,
                    updated_at = :now
WHERE id = ANY(:ids) AND status = 'in_flight' AND lease_until = :lease
""")
_DEAD = text("""
UPDATE delivery SET status = 'dead', lease_until = NULL, last_error = :reason, updated_at = :now
WHERE id = :id AND status = 'in_flight' AND lease_until = :lease
""")
# A coalesced push going back to pending absorbs the newer pending row of the same contact (at most one).
_ABSORB_NEWER = text("""
DELETE FROM delivery p USING delivery e
WHERE e.id = :id AND e.status = 'in_flight' AND e.lease_until = :lease AND e.coalesces
  AND p.destination_id = e.destination_id AND p.contact_id = e.contact_id AND p.status = 'pending' AND p.coalesces
RETURNING p.message_id, p.topic, p.profile_changed, p.changed_lists
""")
_RESCHEDULE = text("""
UPDATE delivery SET status = 'pending', lease_until = NULL, next_attempt_at = :at, last_error = :reason,
                    message_id = GREATEST(message_id, :message_id), topic = COALESCE(:topic, topic),
                    profile_changed = profile_changed OR :profile_changed,
                    changed_lists = ARRAY(SELECT DISTINCT unnest(changed_lists || CAST(:changed_lists AS text[]))),
                    updated_at = :now
WHERE id = :id AND status = 'in_flight' AND lease_until = :lease
""")


async def complete(
    session: AsyncSession, claimed: Claimed, outcome: Completion, *, backoff: Backoff
) -> None:
    now = utc_now()
    lease = claimed.lease_until
    attempts = {r["id"]: r["attempts"] for r in claimed.rows}
    if outcome.delivered:
        await session.execute(_DELIVERED, {"ids": outcome.delivered, "now": now, "lease": lease})
    if outcome.deferred:
        await session.execute(_DEFERRED, {"ids": outcome.deferred, "now": now, "lease": lease})
    dead = dict(outcome.dead)
    for delivery_id, reason in outcome.retry.items():
        if attempts[delivery_id] >= backoff.max_attempts:
            dead[delivery_id] = f"gave up after {attempts[delivery_id]} attempts: {reason}"
            continue
        newer = (await session.execute(_ABSORB_NEWER, {"id": delivery_id, "lease": lease})).first()
        delay = outcome.retry_after if outcome.retry_after is not None else backoff.delay(attempts[delivery_id])
        await session.execute(_RESCHEDULE, {
            "id": delivery_id, "lease": lease, "now": now, "at": now + timedelta(seconds=delay),
            "reason": reason[:500], "message_id": newer[0] if newer else 0, "topic": newer[1] if newer else None,
            "profile_changed": bool(newer and newer[2]), "changed_lists": list(newer[3]) if newer else [],
        })
    for delivery_id, reason in dead.items():
        await session.execute(_DEAD, {"id": delivery_id, "reason": reason[:500], "now": now, "lease": lease})


async def remember_links(session: AsyncSession, destination_id: uuid.UUID, refs: Mapping[uuid.UUID, str]) -> None:
    """The remote records pushes made or found. A retired record one of them took over (its address came back to
    Carnet) is someone's live record now: no longer retired, so no erasure of its former owner deletes it."""
    if not refs:
        return
    values = {"d": destination_id, "ids": list(refs), "refs": list(refs.values()), "now": utc_now()}
    await session.execute(
        text("""
        INSERT INTO sync_link (destination_id, contact_id, remote_ref, synced_at)
        SELECT :d, unnest(CAST(:ids AS uuid[])), unnest(CAST(:refs AS text[])), :now
        ON CONFLICT (destination_id, contact_id) DO UPDATE SET remote_ref = excluded.remote_ref,
                                                               synced_at = excluded.synced_at
        """),
        values,
    )
    await session.execute(
        text("DELETE FROM sync_retired_ref WHERE destination_id = :d AND remote_ref = ANY(CAST(:refs AS text[]))"),
        values,
    )


async def remember_tags(
    session: AsyncSession, destination_id: uuid.UUID, tags: Mapping[uuid.UUID, Sequence[str]]
) -> None:
    """The tags a successful profile push carried: the next push removes remotely what Carnet removed since."""
    if tags:
        await session.execute(
            text("""
            UPDATE sync_link l SET tags = ARRAY(SELECT jsonb_array_elements_text(t.value))
            FROM jsonb_each(CAST(:tags AS jsonb)) t
            WHERE l.destination_id = :d AND l.contact_id = t.key::uuid
            """),
            {"d": destination_id, "tags": json.dumps({str(k): list(v) for k, v in tags.items()})},
        )


async def hand_over_links(session: AsyncSession, duplicate_id: uuid.UUID, survivor_id: uuid.UUID
                          ) -> list[uuid.UUID]:
    """A merge whose survivor takes over the duplicate's address: the vendor's record of that address is the
    survivor's now, so is its link, at each destination where the survivor has none of its own. Its next push then
    updates that record as one the vendor already holds (what it is in there is restated, not left as the duplicate
    had it). The destinations where the link moved."""
    moved = await session.scalars(text("""
        UPDATE sync_link l SET contact_id = :survivor
        WHERE l.contact_id = :duplicate
          AND NOT EXISTS (SELECT 1 FROM sync_link o WHERE o.destination_id = l.destination_id
                                                      AND o.contact_id = :survivor)
        RETURNING l.destination_id
    """), {"duplicate": duplicate_id, "survivor": survivor_id})
    return sorted(moved.all())


_FORGET = """
DELETE FROM {table} t USING unnest(CAST(:ids AS uuid[]), CAST(:refs AS text[])) AS f(contact_id, remote_ref)
WHERE t.destination_id = :d AND t.contact_id = f.contact_id AND t.remote_ref = f.remote_ref
"""


async def forget_refs(session: AsyncSession, destination_id: uuid.UUID, refs: Sequence[Ref]) -> None:
    """After a confirmed remote erasure (or a merge): these traces of the person at this destination go, and only
    these (a record retired, or a link made, since the batch was planned was not deleted by it)."""
    if refs:
        values = {"d": destination_id, "ids": [c for c, _ in refs], "refs": [r for _, r in refs]}
        for table in ("sync_link", "sync_retired_ref"):
            await session.execute(text(_FORGET.format(table=table)), values)


# A pending erasure for one (destination, contact): the plan finds what is left of the person (message 0: first in
# line, like a resync).
_QUEUE_ERASURE = text("""
INSERT INTO delivery (destination_id, contact_id, message_id, topic, coalesces, profile_changed, changed_lists,
                      status, attempts, next_attempt_at, created_at, updated_at)
VALUES (:d, :c, 0, 'contact.erased', true, true, '{}', 'pending', 0, :now, :now, :now)
ON CONFLICT (destination_id, contact_id) WHERE status = 'pending' AND coalesces DO NOTHING
""")


async def retire_refs(
    session: AsyncSession, destination_id: uuid.UUID, retired: Mapping[uuid.UUID, Sequence[str]]
) -> None:
    """Records the vendor archived (kept) for these contacts: remembered until the person's erasure deletes them.

    The person (the end of the contact's chain of merges) is locked while this commits, so their erasure cannot
    be planned in between without seeing these rows; a person already erased gets another erasure queued, which
    finds the rows."""
    if not retired:
        return
    pairs = [(c, ref) for c, refs in retired.items() for ref in refs]
    now = utc_now()
    await session.execute(text("""
        INSERT INTO sync_retired_ref (destination_id, contact_id, remote_ref, retired_at)
        SELECT :d, unnest(CAST(:ids AS uuid[])), unnest(CAST(:refs AS text[])), :now
        ON CONFLICT DO NOTHING
    """), {"d": destination_id, "ids": [c for c, _ in pairs], "refs": [r for _, r in pairs], "now": now})
    for contact_id in retired:
        if not await _lock_person(session, contact_id):
            await session.execute(_QUEUE_ERASURE, {"d": destination_id, "c": contact_id, "now": now})


async def _lock_person(session: AsyncSession, contact_id: uuid.UUID) -> bool:
    """Lock (FOR SHARE) the contact that now carries `contact_id` (itself, or the end of its merges); False if that
    person was erased. A merge or erasure of them waits for this transaction; one that just ran is seen."""
    person = await survivor_of(session, contact_id) or contact_id
    for _ in range(100):  # each turn follows one more merge that committed while we waited
        if await session.scalar(text("SELECT 1 FROM contact WHERE id = :id FOR SHARE"), {"id": person}):
            return True
        after = await survivor_of(session, contact_id) or contact_id
        if after == person:
            return False
        person = after
    return False


async def erasures_owed(session: AsyncSession, destination_id: uuid.UUID) -> int:
    """People erased in Carnet of whom this destination may still hold a record (a link, retired record or store
    record whose contact, or the contact it was merged into, is gone): what its erasure deliveries have yet to
    delete."""
    return int(await session.scalar(_OWED, {"d": destination_id}) or 0)


_OWED = text("""
WITH RECURSIVE held AS (
    SELECT contact_id FROM sync_link WHERE destination_id = :d
    UNION
    SELECT contact_id FROM sync_retired_ref WHERE destination_id = :d
    UNION
    SELECT contact_id FROM sync_commerce WHERE destination_id = :d AND kind IN ('cart', 'order', 'customer')
), orphan AS (
    SELECT h.contact_id FROM held h WHERE NOT EXISTS (SELECT 1 FROM contact c WHERE c.id = h.contact_id)
), chain(start, id, depth) AS (
    SELECT contact_id, contact_id, 0 FROM orphan
    UNION ALL
    SELECT chain.start, m.survivor_id, chain.depth + 1 FROM contact_merge m JOIN chain ON m.merged_id = chain.id
    WHERE chain.depth < 100
), person AS (
    SELECT DISTINCT ON (start) start, id FROM chain ORDER BY start, depth DESC
)
SELECT count(*) FROM person WHERE NOT EXISTS (SELECT 1 FROM contact c WHERE c.id = person.id)
""")


async def record_health(
    session: AsyncSession, destination_id: uuid.UUID, *, error: str | None, disable: bool = False
) -> None:
    """A batch's outcome on the destination's health; `disable`: it must not be used any more (a webhook 410, a
    config it cannot be trusted with), `error` saying why in `disabled_reason` until someone enables it again."""
    now = utc_now()
    if error is None:
        await session.execute(text(
            "UPDATE destination SET last_success_at = :now, consecutive_failures = 0 WHERE id = :d"
        ), {"now": now, "d": destination_id})
        return
    await session.execute(text("""
        UPDATE destination SET last_error_at = :now, last_error = :error,
               consecutive_failures = consecutive_failures + 1,
               enabled = CASE WHEN :disable THEN false ELSE enabled END,
               disabled_reason = CASE WHEN :disable THEN :error ELSE disabled_reason END
        WHERE id = :d
    """), {"now": now, "error": error[:500], "disable": disable, "d": destination_id})
