"""GDPR rights: access (export), erasure, and the retention of inactive prospects.

Erasure removes a person from every table in the caller's transaction, set-based, so one contact and a
retention run of thousands take the same few statements:

1. every email, phone and customer number (external_id) they held (now, or before as their history says) goes to
   the suppression list, with each email's mailbox (keyed hashes, `services/suppressions.py`);
2. values that name the person elsewhere are cleared: import reject reports and file names, a running import's
   keys, refusal notes, and another contact's history where the person's address or number was once typed; they
   look for who the person is and was (their own history: former addresses, records merged into theirs), so they
   run before that history goes;
3. history rows, behaviour events, orders, list memberships and the idempotency records that replay a
   response about the contact or a record merged into it (or were made on its URL) are deleted;
4. the consent ledger is de-identified, not deleted: each event keeps purpose, action, source and dates,
   loses `contact_id` (NULL) and the proof's `ip`, `user_agent` and `form_url`, and the free text (`source`, the
   proof's `wording` and `policy_version`) where it names the person. The ledger's trigger allows exactly this
   UPDATE while `carnet.erasing` is on for this transaction (migrations 0005, 0030);
5. the contact row is deleted (no tombstone: nothing personal would be left in it, and every reader
   would have to learn to skip it);
6. an outbox message `contact.erased` carrying only the contact id tells the emailing tools.

Logs carry ids and counts only.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, any_, cast, delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.errors import ContactNotFound, PreconditionFailed
from app.logging import get_logger
from app.models import (
    Cart,
    ConsentEvent,
    Contact,
    ContactHistory,
    ErasureRequest,
    Event,
    IdempotencyRecord,
    ListMembership,
    MailingList,
    Order,
)
from app.models.base import utc_now
from app.security import Principal
from app.services import consents as consents_service
from app.services import journal, locks, outbox, segment_sync, suppressions
from app.services.commerce import MERGED_PEOPLE
from app.timeouts import set_local

__all__ = ["RETENTION_CHUNK", "ContactExport", "RetentionReport", "erase", "erase_many", "export", "run_retention"]

log = get_logger("carnet.gdpr")

_CHUNK = 1000
# People a retention run erases and commits in one transaction (run_retention).
RETENTION_CHUNK = 1000

_contacts = Contact.__table__  # type: ignore[attr-defined]
_history = ContactHistory.__table__  # type: ignore[attr-defined]
_events = Event.__table__  # type: ignore[attr-defined]
_orders = Order.__table__  # type: ignore[attr-defined]
_carts = Cart.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_lists = MailingList.__table__  # type: ignore[attr-defined]
_ledger = ConsentEvent.__table__  # type: ignore[attr-defined]
_idempotency = IdempotencyRecord.__table__  # type: ignore[attr-defined]
_erasure_requests = ErasureRequest.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ContactExport:
    """Everything held about one person, as rows; the router presents them (masking included)."""

    contact: Row
    memberships: list[Row]
    consents: dict[str, Any]
    orders: list[Row]
    events: list[Row]
    history: list[Row]
    carts: list[Row]


@dataclass(frozen=True, slots=True)
class RetentionReport:
    dry_run: bool
    retention_days: int
    cutoff: datetime
    contact_ids: list[uuid.UUID]


# ---- right of access (art. 15, 20) --------------------------------------------------------------------


async def export(session: AsyncSession, contact_id: uuid.UUID) -> ContactExport:
    contact = (await session.execute(select(_contacts).where(_contacts.c.id == contact_id))).mappings().first()
    if contact is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    memberships = await session.execute(
        select(_members, _lists.c.name.label("list_name"))
        .join(_lists, _lists.c.id == _members.c.list_id)
        .where(_members.c.contact_id == contact_id)
        .order_by(_lists.c.name)
    )
    orders = await session.execute(
        select(_orders).where(_orders.c.contact_id == contact_id).order_by(_orders.c.placed_at, _orders.c.id)
    )
    events = await session.execute(
        select(_events).where(_events.c.contact_id == contact_id).order_by(_events.c.occurred_at, _events.c.id)
    )
    carts = await session.execute(
        select(_carts).where(_carts.c.contact_id == contact_id).order_by(_carts.c.opened_at, _carts.c.id)
    )
    history = await session.execute(
        select(_history).where(_history.c.contact_id == contact_id).order_by(_history.c.id)
    )
    return ContactExport(
        contact=contact,
        memberships=list(memberships.mappings()),
        consents=await consents_service.ledger(session, contact_id),
        orders=list(orders.mappings()),
        events=list(events.mappings()),
        history=list(history.mappings()),
        carts=list(carts.mappings()),
    )


# ---- right to erasure (art. 17) -------------------------------------------------------------------------


async def erase(
    session: AsyncSession, contact_id: uuid.UUID, *, actor: Principal, expected_version: int | None = None,
    journaled: bool = True,
) -> None:
    """Erase one contact (DELETE /v1/contacts/{id}); PreconditionFailed if it moved past `expected_version`.

    `journaled=False`: the person erasing themselves (the preference center), which the access journal leaves out.
    """
    await locks.exclude_import_batches(session)  # before the person's lock (locks.share_with_erasures)
    row = (await session.execute(
        select(_contacts.c.id, _contacts.c.email, _contacts.c.phone, _contacts.c.version)
        .where(_contacts.c.id == contact_id).with_for_update()
    )).mappings().first()
    if row is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    if expected_version is not None and row["version"] != expected_version:
        raise PreconditionFailed(f"the contact is at version {row['version']}", current_version=row["version"])
    await erase_many(session, [row], reason="erasure", by=actor.subject)
    if journaled:
        await journal.record(session, journal.act(actor, "contacts.erased", refs=journal.person_refs(row)))
    log.info("contact.erased", contact_id=str(contact_id), subject=actor.subject)


async def erase_many(session: AsyncSession, contacts: Sequence[Row], *, reason: str, by: str | None = None) -> int:
    """Erase locked contact rows (`id`, `email`, `phone`), in this transaction, set-based; `by`: who (a subject)."""
    if contacts:  # import batches being written finish first, and the next ones see the suppression (locks.py);
        await locks.exclude_import_batches(session)  # every caller took it already, before the contacts' locks
    for start in range(0, len(contacts), _CHUNK):
        chunk = contacts[start:start + _CHUNK]
        ids = [c["id"] for c in chunk]
        roots = await _merged_roots(session, ids)  # records merged into theirs: their ids still name the person
        merged = list(roots)
        await suppressions.suppress(session, [*chunk, *await _former_addresses(session, ids)], reason=reason)
        await journal.forget(session, _journal_people(chunk, roots))
        # Before their history goes: it holds who they were (an address changed since, a record merged in).
        await session.execute(_SCRUB_IMPORT_REPORTS, {"ids": ids})
        await session.execute(_FORGET_IMPORT_KEYS, {"ids": ids})
        await session.execute(_SCRUB_REFUSAL_NOTES, {"ids": ids})
        await session.execute(_SCRUB_FILE_NAMES, {"ids": ids})
        ledger_naming = await _ledger_naming(session, ids)
        await session.execute(_SCRUB_OTHERS_HISTORY, {"ids": ids})
        await session.execute(_DELETE_EVENTS, {"ids": ids})
        for table in (_history, _orders, _carts, _members):
            await session.execute(delete(table).where(table.c.contact_id.in_(ids)))
        await _forget_idempotency_records(session, [*ids, *merged])
        await _deidentify_ledger(session, ids, ledger_naming)
        await session.execute(  # an erasure asked for in the preference center is answered by this one, also
            update(_erasure_requests)  # when asked from the link of a record merged into theirs since
            .where(_erasure_requests.c.contact_id.in_([*ids, *merged]), _erasure_requests.c.status == "open")
            .values(status="completed", resolved_at=utc_now(), resolved_by=by or reason))
        await segment_sync.leave_all(session, ids, reason="erased")  # a receiver of segment.* alone hears it too
        await session.execute(delete(_contacts).where(_contacts.c.id.in_(ids)))
        await outbox.add_many(session, "contact.erased", [(i, {"contact_id": str(i)}) for i in ids])
    return len(contacts)


async def _former_addresses(session: AsyncSession, ids: Sequence[uuid.UUID]) -> list[dict[str, str | None]]:
    """Every email and phone their history says they held (changed since, or a record's merged into theirs), and
    every external_id they hold or held, as rows for `suppressions.suppress`: an old address or customer number must
    not bring them back either (docs/gdpr.md)."""
    rows = (await session.execute(_FORMER_ADDRESSES, {"ids": list(ids)})).all()
    return [{"email": None, "phone": None, "external_id": None} | {kind: value} for kind, value in rows]


_FORMER_ADDRESSES = text("""
    SELECT DISTINCT replace(h.field, 'merged_contact.', ''), v.value
    FROM contact_history h
    CROSS JOIN LATERAL (VALUES (h.old_value #>> '{}'), (h.new_value #>> '{}')) AS v(value)
    WHERE h.contact_id = ANY(:ids) AND v.value IS NOT NULL
      AND h.field IN ('email', 'phone', 'external_id', 'merged_contact.email', 'merged_contact.phone',
                      'merged_contact.external_id')
    UNION
    SELECT 'external_id', external_id FROM contact WHERE id = ANY(:ids) AND external_id IS NOT NULL
""")


# Their events, and the events' dedupe keys (app.services.events): a key names a stored event, and there is none left.
_DELETE_EVENTS = text("""
    WITH gone AS (DELETE FROM event WHERE contact_id = ANY(CAST(:ids AS uuid[])) RETURNING event_id)
    DELETE FROM event_key k USING gone WHERE k.event_id = gone.event_id
""")


async def _merged_roots(session: AsyncSession, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
    """Each record merged into one of these contacts (merges of merges too) → that contact."""
    return dict((await session.execute(_MERGED_ROOTS, {"ids": list(ids)})).all())  # type: ignore[arg-type]


_MERGED_ROOTS = text(MERGED_PEOPLE + " SELECT id, root FROM people WHERE id <> root")  # noqa: S608 (constants)


def _journal_people(contacts: Sequence[Row], roots: Mapping[uuid.UUID, uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """Each erased contact, and each record merged into it, to the person's journal refs (their address digests):
    the entries that reached a merged record reached the person too, and are found by their address after."""
    people = {c["id"]: journal.person_refs(c) for c in contacts}
    return people | {merged: people[root] for merged, root in roots.items()}


async def _forget_idempotency_records(session: AsyncSession, ids: Sequence[uuid.UUID]) -> None:
    """Stored responses that speak of the contact (a create's body, a Location) or were made on its URL."""
    patterns = array([f"%{i}%" for i in ids], type_=Text)
    await session.execute(delete(_idempotency).where(or_(
        _idempotency.c.path.like(any_(patterns)),
        cast(_idempotency.c.response_body, Text).like(any_(patterns)),
        cast(_idempotency.c.response_headers, Text).like(any_(patterns)),
    )))


# A reject report names the cell it refused: an erased person's address, number, customer number or name may be
# that cell or part of it (an email cell holding two addresses, a name cut at 200 characters). The report keeps
# its row, column and reason, not the value. Values are compared as runs of words (`_words`): an email, phone
# or external id anywhere in a value, the full name ("Gwenn Le Goff", either order) anywhere, a first or last
# name alone only as the whole value (erasing one Martin must not clear every report line naming a Martin).
# Each value is split once and meets the needles in a hash join on their first word.
def _words(sql: str) -> str:
    """SQL: ' word word ', lower-cased, digits joined across a space, dot or dash ('06 12 34' → '061234'), words
    split on anything but letters, digits and @._+'- (those dropped at a word's edges)."""
    joined = f"regexp_replace(lower({sql}), '([0-9])[ .-](?=[0-9])', '\\1', 'g')"
    spaced = f"regexp_replace({joined}, '[^[:alnum:]@._+''-]+', ' ', 'g')"
    edged = f"regexp_replace(' ' || {spaced} || ' ', '(^| )[._+''-]+|[._+''-]+( |$)', ' ', 'g')"
    return f"(' ' || trim(regexp_replace({edged}, ' +', ' ', 'g')) || ' ')"


# Who the erased people were: identifiers (email, external id, phone) and names as they are now, and as their own
# history says they were (an address changed since; `merged_contact.*`: what a record merged into theirs was).
_IDENTITY = """
    known(person, kind, value) AS (
        SELECT c.id, k.kind, k.value
        FROM contact c
        CROSS JOIN LATERAL (VALUES ('key', c.email), ('key', c.external_id), ('phone', c.phone),
                                   ('first', c.first_name), ('last', c.last_name)) AS k(kind, value)
        WHERE c.id = ANY(:ids) AND k.value IS NOT NULL
        UNION
        SELECT h.contact_id, CASE f.name WHEN 'first_name' THEN 'first' WHEN 'last_name' THEN 'last'
                                         WHEN 'phone' THEN 'phone' ELSE 'key' END, v.value
        FROM contact_history h
        CROSS JOIN LATERAL (SELECT replace(h.field, 'merged_contact.', '') AS name) f
        CROSS JOIN LATERAL (VALUES (h.old_value #>> '{}'), (h.new_value #>> '{}')) AS v(value)
        WHERE h.contact_id = ANY(:ids) AND f.name IN ('email', 'external_id', 'phone', 'first_name', 'last_name')
          AND v.value IS NOT NULL
    ), identity(kind, value) AS (
        SELECT CASE WHEN kind IN ('first', 'last') THEN 'name' ELSE kind END, value FROM known
        UNION  -- full names, either order, from any first and last name the same person has had
        SELECT 'full', n.value
        FROM known f
        JOIN known l ON l.person = f.person AND f.kind = 'first' AND l.kind = 'last'
        CROSS JOIN LATERAL (VALUES (f.value || ' ' || l.value), (l.value || ' ' || f.value)) AS n(value)
    )"""

# A stored phone is E.164; a file writes it +33 6.., 0033 6.. or 06..: the national forms are its digits after a
# country code of 1, 2 or 3 digits, with or without the trunk 0 (a wrong split only clears a stranger's value).
_PHONE_FORMS = ", ".join(
    ["(CASE WHEN i.kind = 'phone' THEN '00' || d.digits END, false)"]
    + [f"(CASE WHEN i.kind = 'phone' THEN {prefix}substr(d.digits, {n}) END, false)"
       for n in (2, 3, 4) for prefix in ("", "'0' || ")]
)


def _scrub(table: str, column: str, forms: Sequence[str] = ("{value}",)) -> Any:
    """SQL clearing `table.column` wherever it names the erased people (`:ids`), by the rules above; `forms`: the
    ways of reading the value (SQL on `{value}`), any of which naming them clears it."""
    return text(_naming(table, f"r.{column}", forms) + f"""
    UPDATE {table} r SET {column} = NULL FROM hit WHERE r.id = hit.id
""")  # noqa: S608 (built from our own SQL fragments and names; the ids are a parameter)


def _naming(table: str, value: str, forms: Sequence[str] = ("{value}",), where: str = "true") -> str:
    """SQL (a WITH clause) whose `hit(id)` are the rows of `table` (as `r`, filtered by `where`) whose `value`, read
    in any of its `forms`, names the erased people (`:ids`), by the rules above."""
    readings = ", ".join(f"({form.format(value=value)})" for form in forms)
    return f"""
    WITH {_IDENTITY}, needle AS (
        SELECT DISTINCT n.words, split_part(trim(n.words), ' ', 1) AS head, v.whole
        FROM identity i
        CROSS JOIN LATERAL (SELECT regexp_replace(i.value, '[^0-9]', '', 'g') AS digits) d
        CROSS JOIN LATERAL (VALUES (i.value, i.kind = 'name'), {_PHONE_FORMS}) AS v(value, whole)
        CROSS JOIN LATERAL (SELECT {_words("v.value")} AS words) n
        WHERE v.value IS NOT NULL AND trim(n.words) <> ''
    ), report AS MATERIALIZED (
        SELECT r.id, {_words("f.form")} AS words
        FROM {table} r CROSS JOIN LATERAL (VALUES {readings}) AS f(form)
        WHERE {value} IS NOT NULL AND {where}
    ), hit AS (
        SELECT DISTINCT report.id
        FROM report
        CROSS JOIN LATERAL regexp_split_to_table(trim(report.words), ' ') AS w(word)
        JOIN needle ON needle.head = w.word
        WHERE CASE WHEN needle.whole THEN report.words = needle.words
                   ELSE position(needle.words IN report.words) > 0 END
    )"""  # noqa: S608 (built from our own SQL fragments and names; the ids are a parameter)


_SCRUB_IMPORT_REPORTS = _scrub("import_reject", "value")

# A running import's keys (`e:<email>`, `x:<external id>` of its rows that created no contact: duplicates are found
# by them across batches) name the person in clear until the job ends: theirs go now. A later row of theirs is then
# no duplicate but is skipped as suppressed (its address), as a row repeating one that created a contact is.
# Only unfinished jobs hold keys (the end of a job deletes them): an index probe per job and identifier.
_FORGET_IMPORT_KEYS = text(f"""
    WITH {_IDENTITY}
    DELETE FROM import_key k
    USING import_job j, identity i
    WHERE j.status IN ('queued', 'running') AND k.import_id = j.id AND i.kind = 'key'
      AND k.key IN ('e:' || i.value, 'x:' || i.value)
""")  # noqa: S608 (built from our own SQL fragments; the ids are a parameter)
# An admin's reason for refusing an erasure request is free text: "Mme Ada Martin owes invoice 12" names the
# person, "invoices are kept 10 years" does not and stays with the refusal it explains.
_SCRUB_REFUSAL_NOTES = _scrub("erasure_request", "note")
# An import's file name is the importer's free text too ("relance_jean_dupont.csv"): read as it is, without its
# extension, and with `_` (then `_ . -`) as spaces, since a file name has no spaces to separate its words.
_STEM = r"regexp_replace({value}, '\.[A-Za-z0-9]{{1,5}}$', '')"
_SCRUB_FILE_NAMES = _scrub("import_job", "filename", (
    "{value}", _STEM, f"replace({_STEM}, '_', ' ')", f"regexp_replace({_STEM}, '[_.-]+', ' ', 'g')",
))

# Another contact's history may hold the person: their address or number typed on the wrong record, then
# corrected. A change that wrote or removed one of their identifiers there loses, on that side (old or new), every
# personal value it changed at that moment (the name, the address typed with it). A name alone is not enough to
# tell the person from a namesake, so it is only cleared with an identifier. The history is read in full (no
# index on values): ~0.1 s per million history rows, once per erased chunk of 1,000 people.
_PERSONAL_FIELDS = "replace(h.field, 'merged_contact.', '') IN ('email', 'external_id', 'phone', 'first_name', " \
                   "'last_name', 'birth_date') OR h.field LIKE 'address.%'"
_SCRUB_OTHERS_HISTORY = text(f"""
    WITH {_IDENTITY}, identifier AS (
        SELECT DISTINCT lower(value) AS value FROM identity WHERE kind IN ('key', 'phone')
    ), side AS (
        SELECT h.contact_id, h.at, bool_or(lower(h.old_value #>> '{{}}') IN (SELECT value FROM identifier)) AS old,
               bool_or(lower(h.new_value #>> '{{}}') IN (SELECT value FROM identifier)) AS new
        FROM contact_history h
        WHERE h.field IN ('email', 'external_id', 'phone', 'merged_contact.email', 'merged_contact.external_id',
                          'merged_contact.phone')
          AND h.contact_id <> ALL(:ids)
          AND (lower(h.old_value #>> '{{}}') IN (SELECT value FROM identifier)
               OR lower(h.new_value #>> '{{}}') IN (SELECT value FROM identifier))
        GROUP BY h.contact_id, h.at
    )
    UPDATE contact_history h
    SET old_value = CASE WHEN side.old THEN NULL ELSE h.old_value END,
        new_value = CASE WHEN side.new THEN NULL ELSE h.new_value END
    FROM side
    WHERE h.contact_id = side.contact_id AND h.at = side.at AND ({_PERSONAL_FIELDS})
""")  # noqa: S608 (built from our own SQL fragments; the ids are a parameter)


# The ledger's free text is the caller's: `source` ("phone call with Jean Dupont"), the proof's `wording` and
# `policy_version` may name the person. Each of their events loses it where it does, by the rules above (the shop's
# own form wording, naming no one, stays: it shows what the person agreed to). Read before their history goes.
_LEDGER_TEXT = {name: text(_naming("consent_event", value, where="r.contact_id = ANY(:ids)")  # noqa: S608 (ours)
                           + " SELECT id FROM hit")
                for name, value in (("source", "r.source"), ("wording", "r.proof ->> 'wording'"),
                                    ("policy_version", "r.proof ->> 'policy_version'"))}


async def _ledger_naming(session: AsyncSession, ids: Sequence[uuid.UUID]) -> dict[str, list[int]]:
    """Per free-text field of the ledger, the person's events whose value names them."""
    return {name: list((await session.scalars(query, {"ids": list(ids)})).all())
            for name, query in _LEDGER_TEXT.items()}


# The one UPDATE the ledger's trigger allows (migrations 0005, 0030): contact_id NULL, the proof without its personal
# keys, and the free text that names the person (`_ledger_naming`) cleared.
_DEIDENTIFY = text("""
    UPDATE consent_event
    SET contact_id = NULL,
        source = CASE WHEN id = ANY(:source) THEN NULL ELSE source END,
        proof = nullif(proof - ARRAY['ip', 'user_agent', 'form_url']
                       - CASE WHEN id = ANY(:wording) THEN 'wording' ELSE '' END
                       - CASE WHEN id = ANY(:policy_version) THEN 'policy_version' ELSE '' END, '{}'::jsonb)
    WHERE contact_id = ANY(:ids)
""")


async def _deidentify_ledger(session: AsyncSession, ids: Sequence[uuid.UUID], naming: Mapping[str, list[int]]
                             ) -> None:
    """The one UPDATE the ledger's trigger allows, and only while `carnet.erasing` is on (then off again)."""
    await session.execute(text("SELECT set_config('carnet.erasing', 'on', true)"))
    await session.execute(_DEIDENTIFY, {"ids": list(ids), **naming})
    await session.execute(text("SELECT set_config('carnet.erasing', 'off', true)"))


# ---- retention (art. 5(1)(e); CNIL: three years for prospects) -----------------------------------------


async def run_retention(
    sessions: async_sessionmaker[AsyncSession], *, days: int, dry_run: bool, actor: Principal,
    now: datetime | None = None, statement_timeout: float | None = None,
    committed: Callable[[Sequence[uuid.UUID]], None] | None = None,
) -> RetentionReport:
    """Erase prospects with no activity for `days` days; a dry run lists exactly the same ids, changing nothing.

    Activity is the latest of created_at, updated_at, last_activity_at (orders, events) and the latest
    consent event the person made (occurred_at). Only contacts whose kind AND lifecycle stage are both
    `prospect` qualify: a customer, vendor or partner is never erased by retention.

    A real run commits every RETENTION_CHUNK people, each chunk its own transaction (ERASURE_LOCK, the chunk's
    rows, their erasure, its journal entry): a first run over years of prospects held ERASURE_LOCK and every
    row lock for minutes in one transaction, failing every import running meanwhile. A run stopped halfway
    leaves its committed chunks erased; the next run erases the rest. `statement_timeout` (seconds): each
    transaction's own budget (`SET LOCAL`), for a caller whose connections have a shorter one. `committed`: called
    with each chunk's ids once it is committed (the command prints them: a run stopped later still said them).
    """
    cutoff = (now or utc_now()) - timedelta(days=days)
    last_consent = (
        select(func.max(_ledger.c.occurred_at)).where(_ledger.c.contact_id == _contacts.c.id).scalar_subquery()
    )
    activity = func.greatest(_contacts.c.created_at, _contacts.c.updated_at, _contacts.c.last_activity_at,
                             last_consent)
    query = (
        select(_contacts.c.id, _contacts.c.email, _contacts.c.phone)
        .where(_contacts.c.kind == "prospect", _contacts.c.lifecycle_stage == "prospect", activity < cutoff)
        .order_by(_contacts.c.id)
    )
    if dry_run:
        async with _transaction(sessions, statement_timeout) as session:
            rows = list((await session.execute(query)).mappings())
            await journal.record(session, journal.act(actor, "retention.run", count=0, detail={
                "dry_run": True, "erased": 0, "listed": len(rows), "retention_days": days, "part": 1, "parts": 1}))
        log.info("retention.ran", dry_run=True, count=len(rows), retention_days=days, subject=actor.subject)
        return RetentionReport(dry_run=True, retention_days=days, cutoff=cutoff, contact_ids=[r["id"] for r in rows])
    run, erased = uuid.uuid4(), list[uuid.UUID]()
    after: uuid.UUID | None = None  # the last id done
    for part in itertools.count(1):
        async with _transaction(sessions, statement_timeout) as session:
            await locks.exclude_import_batches(session)  # before the contacts' locks (locks.share_with_erasures)
            chunk = query if after is None else query.where(_contacts.c.id > after)
            # A contact being written right now is active: skip it, the next run decides.
            rows = list((await session.execute(
                chunk.limit(RETENTION_CHUNK).with_for_update(of=_contacts, skip_locked=True))).mappings())
            await erase_many(session, rows, reason="retention")
            erased.extend(r["id"] for r in rows)
            last = len(rows) < RETENTION_CHUNK
            # An entry per chunk, committed with it: bounded (a first run may erase years of prospects), and the
            # journal says what a run stopped halfway did. `erased`: the run's people so far; `last` ends the run.
            await journal.record(session, journal.act(
                actor, "retention.run", refs=[ref for r in rows for ref in journal.person_refs(r)], count=len(rows),
                detail={"dry_run": False, "run": str(run), "part": part, "erased": len(erased),
                        "retention_days": days, "last": last}))
        log.info("retention.chunk", part=part, count=len(rows), subject=actor.subject)
        if committed is not None:
            committed([r["id"] for r in rows])
        if last:
            break
        after = rows[-1]["id"]
    log.info("retention.ran", dry_run=False, count=len(erased), retention_days=days, subject=actor.subject)
    return RetentionReport(dry_run=False, retention_days=days, cutoff=cutoff, contact_ids=erased)


@asynccontextmanager
async def _transaction(sessions: async_sessionmaker[AsyncSession], statement_timeout: float | None
                       ) -> AsyncIterator[AsyncSession]:
    async with sessions.begin() as session:
        if statement_timeout is not None:
            await session.execute(text(set_local(statement_timeout)))
        yield session
