"""The preference center: what a person sees and changes through their signed link (no account, no password).

Shown: every list that takes public signups, and every list the person is subscribed to or pending on (they
must be able to leave what they receive); not the shop's other lists. A change acts on that list only and is
on the consent ledger with its proof (the request's ip and user agent, the page, the words shown):

- joining a list: a `granted` email_marketing event naming the list (the link proves the mailbox, as a
  double opt-in confirmation does), then `subscribed`; only lists that take public signups can be joined here;
- leaving a list: a `list_subscription` `withdrawn` event naming the list, then `unsubscribed`: no purpose
  and no other list changes;
- unsubscribing from everything: email_marketing withdrawn (every list), as the one-click `?all=1` link.

Erasure (art. 17) is asked in two steps: the first answers a short-lived confirmation, the second erases at once
(PREFERENCES_ERASURE=self_service) or files a request an admin answers (`request`). Either way an
`erasure_request` row records that the person asked, and when it was answered.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ContactNotFound, FieldError, InvalidInput
from app.models import Contact, ErasureRequest, ListMembership, MailingList
from app.models.base import utc_now
from app.schemas.consents import ConsentAction
from app.security import Principal, Role
from app.services import consents, gdpr, locks, memberships, outbox
from app.services import lists as lists_service

__all__ = [
    "ANSWER_WITHIN",
    "PREFERENCES_BY",
    "ErasureOutcome",
    "change_lists",
    "erase",
    "open_request",
    "unsubscribe_everything",
    "view",
]

PREFERENCES_BY = "link:preferences"   # recorded_by / history subject of what the preference center writes
ANSWER_WITHIN = timedelta(days=30)    # GDPR art. 12(3): one month to answer a request
SOURCE = "preference_center"
_ACTOR = Principal(subject=PREFERENCES_BY, role=Role.INTEGRATION, scopes=frozenset(),
                   token_id="preference-center")  # noqa: S106 (an id, not a secret)

_lists = MailingList.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]
_requests = ErasureRequest.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ErasureOutcome:
    erased: bool                 # True: erased now (self service); False: a request was filed for an admin
    request: Row


async def view(session: AsyncSession, contact_id: uuid.UUID) -> dict[str, Any]:
    """The page's content: the person's address, the lists they may choose, consent, an open erasure request."""
    contact = (await session.execute(
        select(_contacts.c.id, _contacts.c.email, _contacts.c.first_name, _contacts.c.language)
        .where(_contacts.c.id == contact_id)
    )).mappings().first()
    if contact is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    rows = await _choices(session, contact_id)
    state = await consents.marketing_state(session, contact_id)
    return {
        "contact_id": contact["id"],
        "email": contact["email"],
        "first_name": contact["first_name"],
        "language": contact["language"],
        "lists": [{"id": r["id"], "name": r["display_name"] or r["name"], "description": r["description"],
                   "status": r["status"]} for r in rows],
        "email_marketing": {"granted": state.granted},
        "erasure": {"request": await open_request(session, contact_id)},
    }


async def change_lists(
    session: AsyncSession, contact_id: uuid.UUID, wanted: Mapping[uuid.UUID, str], *, proof: Mapping[str, Any],
    wording: Mapping[uuid.UUID, str],
) -> int:
    """Set each named list to `subscribed` or `unsubscribed`; lists not named are left as they are.

    `wording`: the words the page showed for each list (the proof's wording when the list has none of its own).
    Returns how many memberships changed. A list the person cannot choose here is a 422 naming it.
    """
    contact = await consents.lock_contact(session, contact_id)
    choices = {r["id"]: r for r in await _choices(session, contact_id)}
    errors = [FieldError(f"lists.{list_id}", "not a list you can choose here", "unknown_list")
              for list_id in wanted if list_id not in choices]
    if errors:
        raise InvalidInput(*errors)
    changed = 0
    now = utc_now()
    for list_id, status in sorted(wanted.items()):  # one order: two tabs saving at once cannot deadlock
        choice = choices[list_id]
        current = choice["status"]
        if status == memberships.SUBSCRIBED and current in (None, memberships.UNSUBSCRIBED):
            await _join(session, contact, choice, proof=proof, wording=wording.get(list_id), at=now)
            changed += 1
        elif status == memberships.UNSUBSCRIBED and current in (memberships.SUBSCRIBED, memberships.PENDING):
            await memberships.unsubscribe(session, contact_id, list_id=list_id, at=now, reason=SOURCE)
            await consents.append_list_withdrawal(session, contact_id, list_id, source=SOURCE, proof=proof,
                                                  recorded_by=PREFERENCES_BY, at=now)
            changed += 1
    return changed


async def unsubscribe_everything(session: AsyncSession, contact_id: uuid.UUID, *, proof: Mapping[str, Any]) -> int:
    """Withdraw email_marketing (every list leaves with it); a replay stacks nothing. Returns the lists left."""
    await consents.lock_contact(session, contact_id)
    return await lists_service.withdraw_marketing(session, contact_id, source=SOURCE, proof=proof,
                                                  recorded_by=PREFERENCES_BY, reason=SOURCE)


async def open_request(session: AsyncSession, contact_id: uuid.UUID) -> dict[str, Any] | None:
    row = (await session.execute(
        select(_requests).where(_requests.c.contact_id == contact_id, _requests.c.status == "open")
    )).mappings().first()
    return None if row is None else {**row, "due_by": row["requested_at"] + ANSWER_WITHIN}


async def erase(session: AsyncSession, contact_id: uuid.UUID, *, self_service: bool) -> ErasureOutcome:
    """The person confirmed: erase now, or file the request for an admin (one open request per person)."""
    now = utc_now()
    if self_service:
        await locks.exclude_import_batches(session)  # before the request's key lock on the person (locks.py)
        request = (await session.execute(insert(_requests).values(
            id=uuid.uuid4(), contact_id=contact_id, status="completed", source=SOURCE, requested_at=now,
            resolved_at=now, resolved_by="self_service",
        ).returning(*_requests.c))).mappings().one()
        await gdpr.erase(session, contact_id, actor=_ACTOR, journaled=False)  # the person's own act: not journaled
        return ErasureOutcome(True, request)
    await consents.lock_contact(session, contact_id)
    existing = await open_request(session, contact_id)
    if existing is not None:
        return ErasureOutcome(False, existing)
    request = (await session.execute(insert(_requests).values(
        id=uuid.uuid4(), contact_id=contact_id, status="open", source=SOURCE, requested_at=now,
    ).returning(*_requests.c))).mappings().one()
    await outbox.add(session, "erasure.requested", contact_id=contact_id,
                     payload={"contact_id": str(contact_id), "request_id": str(request["id"])})
    return ErasureOutcome(False, {**request, "due_by": now + ANSWER_WITHIN})


async def _join(
    session: AsyncSession, contact: Row, choice: Row, *, proof: Mapping[str, Any], wording: str | None, at: datetime,
) -> None:
    """Subscribe from the preference center: a public list, a kind it takes, an address that can receive mail."""
    field = f"lists.{choice['id']}"
    if not choice["public_signup"]:
        raise InvalidInput.one(field, "this list can be left here, not joined", "not_joinable")
    if not consents.mailable(contact):
        raise InvalidInput.one(field, "this address cannot receive email", "email_undeliverable")
    the_list = await lists_service.lock(session, choice["id"])
    accepted = the_list["accepted_kinds"]
    if accepted is not None and contact["kind"] not in accepted:
        raise InvalidInput.one(field, "this list is not open to you", "kind_not_accepted")
    await consents.append(
        session, contact["id"], purpose=consents.MARKETING, action=ConsentAction.GRANTED.value, source=SOURCE,
        occurred_at=at, recorded_by=PREFERENCES_BY, list_id=choice["id"],
        proof={**proof, "wording": the_list["signup_wording"] or wording,
               "policy_version": the_list["signup_policy_version"]},
    )
    await memberships.put(session, choice["id"], contact["id"], status=memberships.SUBSCRIBED, source=SOURCE, at=at)


async def _choices(session: AsyncSession, contact_id: uuid.UUID) -> list[Row]:
    """Lists that take public signups, and lists the person is on or pending on; with their status, by name."""
    joined = and_(_members.c.list_id == _lists.c.id, _members.c.contact_id == contact_id)
    query = (
        select(_lists.c.id, _lists.c.name, _lists.c.display_name, _lists.c.description, _lists.c.public_signup,
               _members.c.status)
        .select_from(_lists.outerjoin(_members, joined))
        .where(or_(_lists.c.public_signup,
                   _members.c.status.in_((memberships.SUBSCRIBED, memberships.PENDING))))
        .order_by(func.lower(func.coalesce(_lists.c.display_name, _lists.c.name)), _lists.c.id)
        .limit(200)  # bounded: a page people read, not a catalogue
    )
    return list((await session.execute(query)).mappings())
