"""The suppression list: keyed hashes of the emails, phones and customer numbers (external_id) of erased people.

An erased person must never be re-created by accident (an import, a checkout, a back-office sync),
yet Carnet must not keep the address itself. So each address is kept as HMAC-SHA256 of its normalized
form, keyed with a key derived from the deployment secret: without the key nobody can test guesses
against the table, which a bare SHA-256 of an email would allow in seconds.

Every path that creates a contact or gives one a new email, phone or external_id calls `ensure_not_suppressed` after its
write, in the same transaction (app/services/contacts.py says why after).

What an erasure suppresses (docs/gdpr.md, "What suppression covers"): every email, phone and external_id the person
held, as their history says (a former address, a record merged into theirs), and each email's mailbox (`app.mailbox`:
the same Gmail inbox without dots or `+tag`) as one more `email` entry. A value is checked against its own digest and
its mailbox's (`checked`), so `a.da+shop@gmail.com` finds the entry of `ada@gmail.com`, and the other way round.
Re-admission is explicit: `release` (admin) records who released the address and the person's fresh
consent proof, and the address stops being suppressed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, NotFound
from app.ids import keyed_digest, keyed_digester
from app.mailbox import mailbox_key
from app.models import Suppression
from app.models.base import new_id, utc_now
from app.security import Principal
from app.services import journal

__all__ = [
    "KINDS",
    "SUPPRESSED_SQLSTATE",
    "SuppressedContact",
    "SuppressionNotFound",
    "checked",
    "configure",
    "configured",
    "digest",
    "digests",
    "ensure_not_suppressed",
    "key",
    "keyed_digest",
    "release",
    "suppress",
    "suppressed_kinds",
]

KINDS = ("email", "phone", "external_id")
SUPPRESSED_SQLSTATE = "CS001"  # raised by the SQL function carnet_refuse_suppressed (migration 0019)
_t = Suppression.__table__  # type: ignore[attr-defined]
_key: bytes | None = None
_digest: Callable[[str, str], str] | None = None  # keyed_digester(_key): the key's HMAC state prepared once
_UNCONFIGURED = "the suppression key is not configured (app.services.suppressions.configure)"


class SuppressedContact(Conflict):
    slug, title = "suppressed-contact", "This person was erased and may not be added again"


class SuppressionNotFound(NotFound):
    slug, title = "suppression-not-found", "This address is not suppressed"


def configure(secret: str) -> None:
    """Derive the digest key from the deployment secret (the token signer's); called when the app is built.

    A key of its own (HMAC of a fixed label): a suppression digest can never pass as a cursor, a link or a token.
    """
    global _key, _digest
    _key = hmac.new(secret.encode(), b"carnet-suppression-v1", hashlib.sha256).digest()
    _digest = keyed_digester(_key)


def digest(kind: str, value: str) -> str:
    """HMAC-SHA256 of an already normalized email (lowercased), phone (E.164) or external_id (trimmed, as stored)."""
    if _digest is None:  # fail closed: never compare or store unkeyed hashes
        raise RuntimeError(_UNCONFIGURED)
    return _digest(kind, value)


def configured() -> bool:
    return _key is not None


def key() -> bytes:
    """The configured digest key (handed to the import's validating processes, which compute digests too)."""
    if _key is None:
        raise RuntimeError(_UNCONFIGURED)
    return _key


async def suppressed_kinds(session: AsyncSession, *, email: str | None = None, phone: str | None = None,
                           external_id: str | None = None) -> list[str]:
    """Which of the given (normalized) values are currently suppressed: a subset of KINDS."""
    wanted = _entries(email=email, phone=phone, external_id=external_id)
    if not wanted:
        return []
    rows = await session.execute(
        select(_t.c.kind, _t.c.digest).where(_keys_in(wanted), _t.c.released_at.is_(None))
    )
    found = {(kind, value) for kind, value in rows}
    return list(dict.fromkeys(kind for kind, value in wanted if (kind, value) in found))


async def ensure_not_suppressed(session: AsyncSession, *, email: str | None = None, phone: str | None = None,
                                external_id: str | None = None) -> None:
    """Raise SuppressedContact (409) when the email, phone or external_id belongs to an erased person."""
    kinds = await suppressed_kinds(session, email=email, phone=phone, external_id=external_id)
    if kinds:
        raise SuppressedContact(
            f"this {' and '.join(kinds)} belonged to a person who was erased (GDPR art. 17) and may not be added "
            "again; if the person asked to come back, an admin releases it with POST /v1/suppressions/release",
            suppressed=kinds,
        )


async def suppress(session: AsyncSession, contacts: Iterable[Mapping[str, Any]], *, reason: str) -> int:
    """Add the emails (and their mailboxes), phones and external ids of these rows (`email`, `phone`, `external_id`
    if present) to the list, re-suppressing released entries."""
    now = utc_now()
    rows = {
        (kind, value): {"id": new_id(), "kind": kind, "digest": value, "reason": reason, "created_at": now}
        for contact in contacts
        for kind, value in _entries(email=contact["email"], phone=contact["phone"],
                                    external_id=contact.get("external_id"))
    }
    if not rows:
        return 0
    # The person's proof of an earlier release (their IP, their browser, the form's URL) goes from every entry
    # released with theirs, not only from those suppressed again: they came back with an email, not their phone.
    released = select(_t.c.released_at, _t.c.released_by).where(
        tuple_(_t.c.kind, _t.c.digest).in_(list(rows)), _t.c.released_at.is_not(None)).subquery()
    await session.execute(
        update(_t).where(_t.c.released_at == released.c.released_at, _t.c.released_by == released.c.released_by)
        .values(release_proof=None))
    statement = insert(_t).values(list(rows.values()))
    await session.execute(statement.on_conflict_do_update(
        index_elements=[_t.c.kind, _t.c.digest],
        set_={"reason": statement.excluded.reason, "created_at": statement.excluded.created_at,
              "released_at": None, "released_by": None, "release_proof": None},
    ))
    return len(rows)


async def release(
    session: AsyncSession, *, email: str | None, phone: str | None, proof: Mapping[str, Any], actor: Principal,
    external_id: str | None = None,
) -> list[str]:
    """Stop suppressing these values (an email with its mailbox: the person comes back with that inbox); the row
    keeps who released it, when, and the person's proof."""
    wanted = _entries(email=email, phone=phone, external_id=external_id)
    released = await session.execute(
        update(_t)
        .where(_keys_in(wanted), _t.c.released_at.is_(None))
        .values(released_at=utc_now(), released_by=actor.subject, release_proof=dict(proof))
        .returning(_t.c.kind, _t.c.digest)
    )
    done = {(kind, value) for kind, value in released}
    kinds = list(dict.fromkeys(kind for kind, value in wanted if (kind, value) in done))
    if not kinds:
        raise SuppressionNotFound("none of the given values is suppressed")
    # the journal's refs: the digests of the values as given
    given = _digests(email=email, phone=phone, external_id=external_id)
    await journal.record(session, journal.act(actor, "suppressions.released",
                                              refs=journal.erased_refs(given[k] for k in kinds),
                                              detail={"kinds": kinds}))
    return kinds


def _keys_in(wanted: list[tuple[str, str]]) -> Any:
    return tuple_(_t.c.kind, _t.c.digest).in_(wanted)  # served by uq_suppression_kind_digest


def digests(*, email: str | None, phone: str | None) -> dict[str, str]:
    """{kind: keyed digest} of the given normalized values (the values themselves: the journal's refs)."""
    return _digests(email=email, phone=phone)


def checked(*, email: str | None, phone: str | None, external_id: str | None = None) -> tuple[list[str], list[str]]:
    """(kinds, digests) a write of these normalized values is checked against, as SQL arrays: each value's digest
    and the email's mailbox's (an `email` entry too)."""
    entries = _entries(email=email, phone=phone, external_id=external_id)
    return [kind for kind, _ in entries], [value for _, value in entries]


def _entries(*, email: str | None, phone: str | None, external_id: str | None = None) -> list[tuple[str, str]]:
    """(kind, digest) of the values, and of the email's mailbox when it is another address (`app.mailbox`)."""
    entries = list(_digests(email=email, phone=phone, external_id=external_id).items())
    mailbox = mailbox_key(email) if email else None
    if mailbox is not None and mailbox != email:
        entries.insert(1, ("email", digest("email", mailbox)))
    return entries


def _digests(*, email: str | None, phone: str | None, external_id: str | None = None) -> dict[str, str]:
    given = {"email": email, "phone": phone, "external_id": external_id}
    return {kind: digest(kind, value) for kind, value in given.items() if value}
