"""The consent ledger: append events, read the current state per purpose, decide who may be emailed.

State is derived, never stored: events are read in the order things happened (`occurred_at`, then
`id`), so a back-dated grant recorded today cannot undo a withdrawal that happened after it. Every
write locks the contact row first, which serializes consent decisions per contact.

Withdrawing `email_marketing` unsubscribes every list membership of the contact, in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ContactNotFound, FieldError, InvalidInput
from app.models import ConsentEvent, Contact, ListMembership
from app.models.base import utc_now
from app.schemas.consents import ConsentAction, ConsentCreate, ConsentPurpose
from app.security import Principal
from app.services import memberships, outbox

__all__ = [
    "LIST_SUBSCRIPTION",
    "MARKETING",
    "SIGNUP_BY",
    "ConsentRequired",
    "PurposeState",
    "append",
    "append_list_withdrawal",
    "can_email",
    "fold",
    "grant_from_signup",
    "ledger",
    "lock_contact",
    "mailable",
    "marketing_state",
    "record",
]

MARKETING = ConsentPurpose.EMAIL_MARKETING.value
# Events about one list only (leaving it): never part of a purpose's state, so they touch no other list.
LIST_SUBSCRIPTION = "list_subscription"
SIGNUP_BY = "public:signup"            # recorded_by of the grant a public signup gave once it is confirmed
_GRANTING = frozenset({ConsentAction.GRANTED.value, ConsentAction.CONFIRMED.value})
_UNMAILABLE = frozenset({"bounced", "complained"})
# A client clock slightly ahead is tolerated; a grant dated later than that could jump ahead of a withdrawal.
MAX_CLOCK_SKEW = timedelta(minutes=5)

_events = ConsentEvent.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


class ConsentRequired(InvalidInput):
    slug, title = "consent-required", "A current email_marketing consent is required"

    def __init__(self, detail: str, **members: Any) -> None:
        super().__init__(FieldError("consent", detail, "consent_required"), detail=detail)
        self.members.update(members)


@dataclass(frozen=True, slots=True)
class PurposeState:
    granted: bool = False
    since: datetime | None = None           # when the current state began
    last_grant_at: datetime | None = None   # latest granted/confirmed event
    last_withdrawal_at: datetime | None = None


# ---- use cases -------------------------------------------------------------------------------------------


async def record(session: AsyncSession, contact_id: uuid.UUID, data: ConsentCreate, *, actor: Principal) -> Row:
    """Append one event to a contact's ledger (POST /v1/contacts/{id}/consents).

    A `confirmed` without a proof confirms the grant in force when it happened (a double opt-in click): with none
    (never granted, or withdrawn since), it would make the purpose granted with nothing to show (art. 7(1)).
    """
    await lock_contact(session, contact_id)
    if data.action is ConsentAction.CONFIRMED and data.proof is None and not await _in_force(
            session, contact_id, data.purpose.value, data.occurred_at or utc_now()):
        raise InvalidInput.one("proof", f"no {data.purpose.value} grant is in force to confirm: record a granted "
                               "event with its proof (GDPR art. 7(1)), or send a proof", "nothing_to_confirm")
    return await append(
        session, contact_id, purpose=data.purpose.value, action=data.action.value, source=data.source,
        occurred_at=data.occurred_at, proof=data.proof.model_dump(mode="json") if data.proof else None,
        recorded_by=actor.subject,
    )


async def append(
    session: AsyncSession,
    contact_id: uuid.UUID,
    *,
    purpose: str,
    action: str,
    source: str | None,
    occurred_at: datetime | None,
    proof: Mapping[str, Any] | None,
    recorded_by: str,
    field: str = "occurred_at",
    list_id: uuid.UUID | None = None,
) -> Row:
    """Append an event (the contact must already be locked by the caller); `list_id`: the list it was given for.

    If email_marketing is no longer granted afterwards, every membership of the contact is unsubscribed.
    """
    now = utc_now()
    if occurred_at is not None and occurred_at > now + MAX_CLOCK_SKEW:
        raise InvalidInput.one(field, "a consent cannot be dated in the future", "in_future")
    values = {
        "contact_id": contact_id, "purpose": purpose, "action": action, "source": source,
        "occurred_at": occurred_at or now, "recorded_at": now, "recorded_by": recorded_by,
        "proof": _compact(proof), "list_id": list_id,
    }
    # A grant is news only when it makes the purpose granted (a vendor lifts its opt-out, a synced segment's
    # members may now be sent): not when it was granted already, nor when a later withdrawal still stands.
    news = action in _GRANTING and not await _granted_at(session, contact_id, purpose, values["occurred_at"])
    row = (await session.execute(insert(_events).values(values).returning(*_events.c))).mappings().one()
    if news:
        await outbox.add(session, "consent.granted", contact_id=contact_id,
                         payload={"contact_id": str(contact_id), "purpose": purpose})
    if action not in _GRANTING:
        await outbox.add(session, "consent.withdrawn", contact_id=contact_id,
                         payload={"contact_id": str(contact_id), "purpose": purpose})
    if purpose == MARKETING and action not in _GRANTING and not (await marketing_state(session, contact_id)).granted:
        await memberships.unsubscribe(session, contact_id, list_id=None, at=now, reason="consent_withdrawn")
    return row


async def append_list_withdrawal(
    session: AsyncSession, contact_id: uuid.UUID, list_id: uuid.UUID, *, source: str, proof: Mapping[str, Any] | None,
    recorded_by: str, at: datetime,
) -> Row:
    """The person left one list: on the ledger with its proof, without changing any purpose (nor any other list).
    The membership change itself tells the destinations (`membership.unsubscribed`)."""
    values = {"contact_id": contact_id, "purpose": LIST_SUBSCRIPTION, "action": ConsentAction.WITHDRAWN.value,
              "source": source, "occurred_at": at, "recorded_at": utc_now(), "recorded_by": recorded_by,
              "proof": _compact(proof), "list_id": list_id}
    return (await session.execute(insert(_events).values(values).returning(*_events.c))).mappings().one()


async def grant_from_signup(session: AsyncSession, membership: Mapping[str, Any]) -> None:
    """A public signup's grant, kept with its proof on the pending membership, goes on the ledger when the person
    confirms (dated when they signed up): an unconfirmed form never lifts an opt-out nor counts as consent."""
    proof = dict(membership["pending_proof"] or {})
    if not proof:
        return
    signed_up_at = datetime.fromisoformat(proof.pop("at"))
    await append(session, membership["contact_id"], purpose=MARKETING, action=ConsentAction.GRANTED.value,
                 source="public_signup", occurred_at=signed_up_at, proof=proof, recorded_by=SIGNUP_BY,
                 list_id=membership["list_id"])


async def _in_force(session: AsyncSession, contact_id: uuid.UUID, purpose: str, at: datetime) -> bool:
    """Whether the purpose is granted at `at`: its latest event up to then (recording order on a tie) grants."""
    latest = await session.scalar(
        select(_events.c.action)
        .where(_events.c.contact_id == contact_id, _events.c.purpose == purpose, _events.c.occurred_at <= at)
        .order_by(_events.c.occurred_at.desc(), _events.c.id.desc()).limit(1)
    )
    return latest in _GRANTING


async def _granted_at(session: AsyncSession, contact_id: uuid.UUID, purpose: str, at: datetime) -> bool:
    """Whether the purpose already counts as granted for an event dated `at` (or is withdrawn after it)."""
    latest = (await session.execute(
        select(_events.c.action, _events.c.occurred_at)
        .where(_events.c.contact_id == contact_id, _events.c.purpose == purpose)
        .order_by(_events.c.occurred_at.desc(), _events.c.id.desc()).limit(1)
    )).first()
    return latest is not None and (latest.action in _GRANTING or latest.occurred_at > at)


async def ledger(session: AsyncSession, contact_id: uuid.UUID) -> dict[str, Any]:
    """The whole ledger in the order things happened, and the current state of every purpose."""
    await _contact(session, contact_id)
    rows = list((await session.execute(
        select(_events).where(_events.c.contact_id == contact_id).order_by(_events.c.occurred_at, _events.c.id)
    )).mappings())
    states = fold(rows)
    return {
        "contact_id": contact_id,
        "state": {p.value: {"granted": states.get(p.value, PurposeState()).granted,
                            "since": states.get(p.value, PurposeState()).since} for p in ConsentPurpose},
        "events": rows,
    }


async def marketing_state(session: AsyncSession, contact_id: uuid.UUID) -> PurposeState:
    rows = (await session.execute(
        select(_events.c.purpose, _events.c.action, _events.c.occurred_at)
        .where(_events.c.contact_id == contact_id, _events.c.purpose == MARKETING)
        .order_by(_events.c.occurred_at, _events.c.id)
    )).mappings()
    return fold(rows).get(MARKETING, PurposeState())


async def can_email(session: AsyncSession, contact_id: uuid.UUID) -> dict[str, bool]:
    """marketing: mailable address + current email_marketing grant + subscribed to a list.

    transactional: an address that does not bounce (a complaint is about marketing, not order mail).
    """
    contact = await _contact(session, contact_id)
    subscribed = await session.scalar(select(exists().where(
        _members.c.contact_id == contact_id, _members.c.status == memberships.SUBSCRIBED
    )))
    marketing = mailable(contact) and bool(subscribed) and (await marketing_state(session, contact_id)).granted
    transactional = contact["email"] is not None and contact["email_status"] != "bounced"
    return {"marketing": marketing, "transactional": transactional}


async def lock_contact(session: AsyncSession, contact_id: uuid.UUID) -> Row:
    """Lock the contact for this transaction (consent decisions are serialized per contact)."""
    row = (await session.execute(
        select(_contacts.c.id, _contacts.c.email, _contacts.c.email_status, _contacts.c.kind)
        .where(_contacts.c.id == contact_id)
        .with_for_update(key_share=True)  # FOR NO KEY UPDATE: inserts referencing the contact still go through
    )).mappings().first()
    if row is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    return row


def fold(events: Iterable[Mapping[str, Any]]) -> dict[str, PurposeState]:
    """The state of each purpose after events given in the order they happened."""
    states: dict[str, PurposeState] = {}
    for event in events:
        current = states.get(event["purpose"])
        at = event["occurred_at"]
        granting = event["action"] in _GRANTING
        changed = current is None or current.granted != granting
        previous = current or PurposeState()
        states[event["purpose"]] = PurposeState(
            granted=granting,
            since=at if changed else previous.since,
            last_grant_at=at if granting else previous.last_grant_at,
            last_withdrawal_at=previous.last_withdrawal_at if granting else at,
        )
    return states


def mailable(contact: Mapping[str, Any]) -> bool:
    return contact["email"] is not None and contact["email_status"] not in _UNMAILABLE


# ---- helpers ---------------------------------------------------------------------------------------------


async def _contact(session: AsyncSession, contact_id: uuid.UUID) -> Row:
    row = (await session.execute(
        select(_contacts.c.id, _contacts.c.email, _contacts.c.email_status).where(_contacts.c.id == contact_id)
    )).mappings().first()
    if row is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    return row


def _compact(proof: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not proof:
        return None
    kept = {k: v for k, v in proof.items() if v is not None}
    return kept or None
