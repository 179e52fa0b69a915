"""Newsletter signup from the shop's own pages (POST /v1/public/lists/{id}/signup): always double opt-in.

Whatever the address (new, known, already subscribed, suppressed, or a bot caught by the honeypot) the caller
gets the same answer, so the form tells nobody who is in the file. What differs happens here, silently:

- a filled honeypot, a suppressed (erased) address: nothing is written;
- an unknown address: a contact is created (source `newsletter_form`) with the names given; a known contact is
  never changed by an anonymous form;
- an address that bounced or complained, a kind the list does not accept, already subscribed: nothing;
- otherwise the membership is `pending` with the request's proof kept on it, and the confirmation is asked for
  the way every double opt-in asks (outbox: the vendor's double opt-in or the webhook event).

The email_marketing grant goes on the ledger when the person confirms, dated when they signed up, with this
proof (`consents.grant_from_signup`): until then an anonymous form counts as nobody's consent, so it can neither
lift an opt-out nor let a synced segment reach the address.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ContactNotFound, DuplicateContact
from app.logging import get_logger
from app.models import Contact, MailingList
from app.schemas.contacts import ContactCreate
from app.schemas.signup import SignupForm
from app.security import Principal, Role
from app.services import consents, contacts, memberships, suppressions
from app.services import lists as lists_service
from app.services.links import LinkBuilder
from app.services.lists import ListNotFound, rfc3339
from app.services.suppressions import SuppressedContact

__all__ = ["PUBLIC_SIGNUP", "open_list", "sign_up"]

log = get_logger("carnet.signup")

# Who wrote what a public signup wrote (history's subject); it holds no scope and reaches nothing else.
PUBLIC_SIGNUP = Principal(subject=consents.SIGNUP_BY, role=Role.INTEGRATION, scopes=frozenset(),
                          token_id="public-signup")  # noqa: S106 (an id, not a secret)
_SOURCE = "newsletter_form"

_lists = MailingList.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]


async def open_list(session: AsyncSession, list_id: uuid.UUID) -> Mapping[str, Any]:
    """A list that takes browser signups; any other (closed, unknown) is the same 404."""
    row = (await session.execute(select(*_lists.c).where(_lists.c.id == list_id))).mappings().first()
    if row is None or not row["public_signup"]:
        raise ListNotFound(f"no list with id {list_id} takes signups")
    return row


async def sign_up(
    session: AsyncSession, list_id: uuid.UUID, form: SignupForm, *, proof: Mapping[str, Any], links: LinkBuilder,
    at: datetime,
) -> str:
    """Do what this signup calls for; returns what happened, for logs and tests only (never for the caller)."""
    if form.website:
        return "honeypot"
    if await suppressions.suppressed_kinds(session, email=form.email):
        return "suppressed"
    the_list = await lists_service.lock(session, list_id)  # cannot be deleted or closed under us
    if not the_list["public_signup"]:
        return "closed"
    try:
        contact = await _find_or_create(session, form)
    except SuppressedContact:  # erased while this request ran (contacts.create checks after its insert)
        return "suppressed"
    accepted = the_list["accepted_kinds"]
    if not consents.mailable(contact) or (accepted is not None and contact["kind"] not in accepted):
        return "not_mailable"
    current = await memberships.get(session, list_id, contact["id"], lock=True)
    if current is not None and current["status"] == memberships.SUBSCRIBED:
        return "already_subscribed"
    kept = {"at": rfc3339(at), **proof, "wording": the_list["signup_wording"],
            "policy_version": the_list["signup_policy_version"]}
    if current is not None and current["status"] == memberships.PENDING:
        await memberships.keep_pending_proof(session, list_id, contact["id"], kept)
    else:
        await memberships.put(session, list_id, contact["id"], status=memberships.PENDING, source=_SOURCE, at=at,
                              pending_proof=kept)
    await lists_service.request_confirmation(session, the_list, contact["id"], links=links, at=at)
    return "pending"


async def _find_or_create(session: AsyncSession, form: SignupForm) -> Mapping[str, Any]:
    """The contact holding the address, locked; created when there is none (a concurrent signup of the same new
    address finds the one the other created)."""
    for _attempt in range(3):
        found = (await session.execute(
            select(_contacts.c.id).where(_contacts.c.email == form.email)
        )).scalar_one_or_none()
        if found is None:
            try:
                async with session.begin_nested():  # a refusal raised after the insert undoes it
                    found = (await contacts.create(session, ContactCreate(
                        email=form.email, first_name=form.first_name, last_name=form.last_name, source=_SOURCE,
                    ), actor=PUBLIC_SIGNUP, via="public_signup"))["id"]
            except DuplicateContact:
                continue  # created meanwhile by a concurrent request: find it
        try:
            return await consents.lock_contact(session, found)
        except ContactNotFound:
            continue  # merged away or erased meanwhile: look again
    raise DuplicateContact("the address is being created by another request; retry")
