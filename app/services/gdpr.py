"""GDPR rights: access (export), erasure, and the retention of inactive prospects.

Erasure removes a person from every table in the caller's transaction, set-based, so one contact and a
retention run of thousands take the same few statements:

1. the email and phone go to the suppression list (keyed hashes, `services/suppressions.py`);
2. history rows, behaviour events, orders, list memberships and the idempotency records that replay a
   response about the contact (or were made on its URL) are deleted;
3. the consent ledger is de-identified, not deleted: each event keeps purpose, action, source and dates,
   loses `contact_id` (NULL) and the proof's `ip`, `user_agent` and `form_url`. The ledger's trigger
   allows exactly this UPDATE while `carnet.erasing` is on for this transaction (migration 0005);
4. the contact row is deleted (no tombstone: nothing personal would be left in it, and every reader
   would have to learn to skip it);
5. an outbox message `contact.erased` carrying only the contact id tells the emailing tools.

Logs carry ids and counts only.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, any_, cast, delete, func, literal, or_, select, text, update
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ContactNotFound, PreconditionFailed
from app.logging import get_logger
from app.models import (
    ConsentEvent,
    Contact,
    ContactHistory,
    Event,
    IdempotencyRecord,
    ListMembership,
    MailingList,
    Order,
)
from app.models.base import utc_now
from app.security import Principal
from app.services import consents as consents_service
from app.services import outbox, suppressions

__all__ = ["ContactExport", "RetentionReport", "erase", "erase_many", "export", "run_retention"]

log = get_logger("carnet.gdpr")

ERASED_PROOF_KEYS = ("ip", "user_agent", "form_url")  # the proof's personal data; wording and policy stay
_CHUNK = 1000

_contacts = Contact.__table__  # type: ignore[attr-defined]
_history = ContactHistory.__table__  # type: ignore[attr-defined]
_events = Event.__table__  # type: ignore[attr-defined]
_orders = Order.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_lists = MailingList.__table__  # type: ignore[attr-defined]
_ledger = ConsentEvent.__table__  # type: ignore[attr-defined]
_idempotency = IdempotencyRecord.__table__  # type: ignore[attr-defined]

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
    )


# ---- right to erasure (art. 17) -------------------------------------------------------------------------


async def erase(
    session: AsyncSession, contact_id: uuid.UUID, *, actor: Principal, expected_version: int | None = None
) -> None:
    """Erase one contact (DELETE /v1/contacts/{id}); PreconditionFailed if it moved past `expected_version`."""
    row = (await session.execute(
        select(_contacts.c.id, _contacts.c.email, _contacts.c.phone, _contacts.c.version)
        .where(_contacts.c.id == contact_id).with_for_update()
    )).mappings().first()
    if row is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    if expected_version is not None and row["version"] != expected_version:
        raise PreconditionFailed(f"the contact is at version {row['version']}", current_version=row["version"])
    await erase_many(session, [row], reason="erasure")
    log.info("contact.erased", contact_id=str(contact_id), subject=actor.subject)


async def erase_many(session: AsyncSession, contacts: Sequence[Row], *, reason: str) -> int:
    """Erase locked contact rows (`id`, `email`, `phone`), in this transaction, set-based."""
    for start in range(0, len(contacts), _CHUNK):
        chunk = contacts[start:start + _CHUNK]
        ids = [c["id"] for c in chunk]
        await suppressions.suppress(session, chunk, reason=reason)
        for table in (_history, _events, _orders, _members):
            await session.execute(delete(table).where(table.c.contact_id.in_(ids)))
        await _forget_idempotency_records(session, ids)
        await _deidentify_ledger(session, ids)
        await _scrub_import_reports(session, ids)
        await session.execute(delete(_contacts).where(_contacts.c.id.in_(ids)))
        await outbox.add_many(session, "contact.erased", [(i, {"contact_id": str(i)}) for i in ids])
    return len(contacts)


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


# A stored phone is E.164; a file writes it +33 6.., 0033 6.. or 06..: the national forms are its digits after a
# country code of 1, 2 or 3 digits, with or without the trunk 0 (a wrong split only clears a stranger's value).
_PHONE_FORMS = ", ".join(
    ["('00' || d.digits, false)"]
    + [f"({prefix}substr(d.digits, {n}), false)" for n in (2, 3, 4) for prefix in ("", "'0' || ")]
)
_SCRUB_IMPORT_REPORTS = text(f"""
    WITH needle AS (
        SELECT DISTINCT n.words, split_part(trim(n.words), ' ', 1) AS head, v.whole
        FROM contact c
        CROSS JOIN LATERAL (SELECT regexp_replace(c.phone, '[^0-9]', '', 'g') AS digits) d
        CROSS JOIN LATERAL (VALUES (c.email, false), (c.phone, false), (c.external_id, false),
                                   (c.first_name || ' ' || c.last_name, false),
                                   (c.last_name || ' ' || c.first_name, false),
                                   (c.first_name, true), (c.last_name, true), {_PHONE_FORMS}) AS v(value, whole)
        CROSS JOIN LATERAL (SELECT {_words("v.value")} AS words) n
        WHERE c.id = ANY(:ids) AND v.value IS NOT NULL AND trim(n.words) <> ''
    ), report AS MATERIALIZED (
        SELECT r.id, {_words("r.value")} AS words FROM import_reject r WHERE r.value IS NOT NULL
    ), hit AS (
        SELECT DISTINCT report.id
        FROM report
        CROSS JOIN LATERAL regexp_split_to_table(trim(report.words), ' ') AS w(word)
        JOIN needle ON needle.head = w.word
        WHERE CASE WHEN needle.whole THEN report.words = needle.words
                   ELSE position(needle.words IN report.words) > 0 END
    )
    UPDATE import_reject r SET value = NULL FROM hit WHERE r.id = hit.id
""")  # noqa: S608 (built from our own SQL fragments; the ids are a parameter)


async def _scrub_import_reports(session: AsyncSession, ids: Sequence[uuid.UUID]) -> None:
    await session.execute(_SCRUB_IMPORT_REPORTS, {"ids": list(ids)})


async def _deidentify_ledger(session: AsyncSession, ids: Sequence[uuid.UUID]) -> None:
    """The one UPDATE the ledger's trigger allows, and only while `carnet.erasing` is on (then off again)."""
    await session.execute(text("SELECT set_config('carnet.erasing', 'on', true)"))
    stripped = _ledger.c.proof.op("-")(array(list(ERASED_PROOF_KEYS), type_=Text))
    await session.execute(
        update(_ledger).where(_ledger.c.contact_id.in_(ids))
        .values(contact_id=None, proof=func.nullif(stripped, literal({}, _ledger.c.proof.type)))
    )
    await session.execute(text("SELECT set_config('carnet.erasing', 'off', true)"))


# ---- retention (art. 5(1)(e); CNIL: three years for prospects) -----------------------------------------


async def run_retention(
    session: AsyncSession, *, days: int, dry_run: bool, actor: Principal, now: datetime | None = None
) -> RetentionReport:
    """Erase prospects with no activity for `days` days; a dry run lists exactly the same ids, changing nothing.

    Activity is the latest of created_at, updated_at, last_activity_at (orders, events) and the latest
    consent event the person made (occurred_at). Only contacts whose kind AND lifecycle stage are both
    `prospect` qualify: a customer, vendor or partner is never erased by retention.
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
    if not dry_run:  # a contact being written right now is active: skip it, the next run decides
        query = query.with_for_update(of=_contacts, skip_locked=True)
    rows = list((await session.execute(query)).mappings())
    if not dry_run:
        await erase_many(session, rows, reason="retention")
    log.info("retention.ran", dry_run=dry_run, count=len(rows), retention_days=days, subject=actor.subject)
    return RetentionReport(dry_run=dry_run, retention_days=days, cutoff=cutoff, contact_ids=[r["id"] for r in rows])
