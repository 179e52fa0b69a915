"""Lists and subscriptions: list CRUD, subscribe/unsubscribe with the consent rules, the public links.

Subscribing needs (in this order): a mailable email (present, not bounced or complained), a contact kind
the list accepts, and a current email_marketing grant on the ledger, possibly given in the same call.
Someone who unsubscribed from the list needs a grant dated after that unsubscribe. A double opt-in list
makes the membership `pending` and asks (through the outbox) for a confirmation email.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select, true
from sqlalchemy import update as update_statement
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import is_unique_violation
from app.errors import AppError, Conflict, ContactNotFound, FieldError, InvalidInput, NotFound, PreconditionFailed
from app.models import Contact, ListMembership, MailingList
from app.models.base import new_id, utc_now
from app.schemas.consents import ConsentAction
from app.schemas.lists import ListCreate, ListPatch, SubscribeRequest
from app.security import Principal, Scope
from app.services import consents, locks, memberships, outbox
from app.services.links import CONFIRM_LINK_TTL, Link, LinkBuilder
from app.services.locks import survivor_of
from app.services.pagination import CursorCodec, page_by_name
from app.services.segments import segments_naming_list

__all__ = [
    "ConfirmationCancelled",
    "DuplicateList",
    "ListInUse",
    "ListNotFound",
    "Subscribed",
    "confirm",
    "create",
    "delete_list",
    "ensure_exists",
    "follow_link",
    "get",
    "link_target",
    "list_page",
    "lock",
    "lock_contacts",
    "lock_link_holder",
    "members_page",
    "public_face",
    "request_confirmation",
    "subscribe",
    "unsubscribe",
    "unsubscribe_by_link",
    "update",
    "withdraw_marketing",
]

CONFIRMED_BY = "link:confirm"          # recorded_by of events made through the public links
UNSUBSCRIBED_BY = "link:unsubscribe"

_lists = MailingList.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


class ListNotFound(NotFound):
    slug, title = "list-not-found", "No such list"


class DuplicateList(Conflict):
    slug, title = "duplicate-list", "A list with this name already exists"


class ListInUse(Conflict):
    slug, title = "list-in-use", "A segment's filter names the list"


class ConfirmationCancelled(AppError):
    status, slug, title = 410, "confirmation-cancelled", "This subscription is no longer waiting for confirmation"


@dataclass(frozen=True, slots=True)
class Subscribed:
    row: Row
    created: bool


# ---- lists -----------------------------------------------------------------------------------------------


async def list_page(
    session: AsyncSession, *, limit: int, cursor: str | None, codec: CursorCodec
) -> tuple[list[Row], str | None]:
    """Lists by name (keyset on the unique name)."""
    return await page_by_name(session, _with_counts(), _lists.c.name, sort="lists:name",
                              limit=limit, cursor=cursor, codec=codec)


async def ensure_exists(session: AsyncSession, list_id: uuid.UUID) -> None:
    """A filter on an unknown list is a 404, as an unknown segment is, not an empty answer."""
    if await session.scalar(select(_lists.c.id).where(_lists.c.id == list_id)) is None:
        raise ListNotFound(f"no list with id {list_id}")


async def get(session: AsyncSession, list_id: uuid.UUID) -> Row:
    row = (await session.execute(_with_counts().where(_lists.c.id == list_id))).mappings().first()
    if row is None:
        raise ListNotFound(f"no list with id {list_id}")
    return row


async def create(session: AsyncSession, data: ListCreate) -> Row:
    now = utc_now()
    values = {**data.model_dump(mode="json"), "id": new_id(), "version": 1, "created_at": now, "updated_at": now}
    _check_public_signup(values)
    inserted = await session.scalar(insert(_lists).values(values).on_conflict_do_nothing().returning(_lists.c.id))
    if inserted is None:
        raise DuplicateList(f"a list named {data.name!r} already exists", existing_id=await _id_of(session, data.name))
    return await get(session, inserted)


async def update(
    session: AsyncSession, list_id: uuid.UUID, patch: ListPatch, *, expected_version: int | None
) -> Row:
    """Merge patch; a name held by another list is a 409. Existing memberships keep their status."""
    current = await _lock_list(session, list_id, for_update=True)
    _check_version(current, expected_version)
    changes = {k: v for k, v in patch.model_dump(mode="json", exclude_unset=True).items() if current[k] != v}
    _check_public_signup({**current, **changes})
    if changes:
        statement = (
            update_statement(_lists)
            .where(_lists.c.id == list_id)
            .values(**changes, version=_lists.c.version + 1, updated_at=utc_now())
        )
        try:
            async with session.begin_nested():  # keep the transaction usable to name the holder
                await session.execute(statement)
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            raise DuplicateList(f"a list named {changes['name']!r} already exists",
                                existing_id=await _id_of(session, changes["name"])) from None
    return await get(session, list_id)


async def delete_list(session: AsyncSession, list_id: uuid.UUID, *, expected_version: int | None) -> None:
    """Deletes the list and its memberships; the consent ledger keeps every event. 409 while a segment names it."""
    current = await _lock_list(session, list_id, for_update=True)  # a segment being saved naming it: we wait
    _check_version(current, expected_version)
    naming = await segments_naming_list(session, list_id)
    if naming:  # deleted, the list would leave their conditions matching nobody, silently
        raise ListInUse(f"the filter of {len(naming)} segment(s) names this list: change them first",
                        segment_ids=[str(i) for i in naming])
    await session.execute(delete(_lists).where(_lists.c.id == list_id))


# ---- memberships -----------------------------------------------------------------------------------------


async def members_page(
    session: AsyncSession, list_id: uuid.UUID, *, status: str | None, limit: int, cursor: str | None,
    codec: CursorCodec,
) -> tuple[list[Row], str | None]:
    if await session.scalar(select(_lists.c.id).where(_lists.c.id == list_id)) is None:
        raise ListNotFound(f"no list with id {list_id}")
    return await memberships.page(session, list_id, status=status, limit=limit, cursor=cursor, codec=codec)


async def subscribe(
    session: AsyncSession,
    list_id: uuid.UUID,
    contact_id: uuid.UUID,
    request: SubscribeRequest,
    *,
    actor: Principal,
    links: LinkBuilder,
) -> Subscribed:
    """PUT a contact in a list: `subscribed`, or `pending` on a double opt-in list (confirmation requested)."""
    the_list = await _lock_list(session, list_id, for_update=False)
    contact = await consents.lock_contact(session, contact_id)
    _check_mailable(contact, actor)
    accepted = the_list["accepted_kinds"]
    if accepted is not None and contact["kind"] not in accepted:
        raise InvalidInput.one("contact.kind", _kind_refused(accepted, contact["kind"], actor), "kind_not_accepted")
    current = await memberships.get(session, list_id, contact_id, lock=True)
    consent = request.consent
    if consent is not None:
        await consents.append(
            session, contact_id, purpose=consents.MARKETING, action=ConsentAction.GRANTED.value,
            source=consent.source or request.source, occurred_at=consent.occurred_at,
            proof=consent.proof.model_dump(mode="json"), recorded_by=actor.subject, field="consent.occurred_at",
        )
    if current is not None and current["status"] == memberships.SUBSCRIBED:
        return Subscribed(current, created=False)
    await _check_consent(session, contact_id, current, actor)
    now = utc_now()
    source = request.source or (consent.source if consent else None) or "api"
    if not the_list["double_opt_in"]:
        row = await memberships.put(session, list_id, contact_id, status=memberships.SUBSCRIBED, source=source, at=now)
        return Subscribed(row, created=current is None)
    if current is not None and current["status"] == memberships.PENDING:
        row = current  # asked again: send a fresh confirmation link, keep pending_since
    else:
        row = await memberships.put(session, list_id, contact_id, status=memberships.PENDING, source=source, at=now)
    await request_confirmation(session, the_list, contact_id, links=links, at=now)
    return Subscribed(row, created=current is None)


async def request_confirmation(
    session: AsyncSession, the_list: Row, contact_id: uuid.UUID, *, links: LinkBuilder, at: datetime
) -> None:
    """Ask (through the outbox: a vendor's double opt-in or a webhook event) for the confirmation email."""
    expires_at = at + CONFIRM_LINK_TTL
    await outbox.add(session, "membership.confirmation_requested", contact_id=contact_id, payload={
        "list_id": str(the_list["id"]),
        "list_name": the_list["name"],
        "contact_id": str(contact_id),
        "confirm_url": links.confirm_url(contact_id, the_list["id"], expires_at=expires_at),
        "confirm_expires_at": rfc3339(expires_at),
        "unsubscribe_url": links.unsubscribe_url(contact_id, the_list["id"]),
    })


async def unsubscribe(session: AsyncSession, list_id: uuid.UUID, contact_id: uuid.UUID) -> Row:
    """That list only; every other list and transactional email are unaffected. Idempotent."""
    await _lock_list(session, list_id, for_update=False)
    await consents.lock_contact(session, contact_id)
    current = await memberships.get(session, list_id, contact_id, lock=True)
    if current is None:
        raise memberships.MembershipNotFound(f"contact {contact_id} is not a member of list {list_id}")
    changed = await memberships.unsubscribe(session, contact_id, list_id=list_id, at=utc_now(), reason="api")
    return changed[0] if changed else current


async def lock(session: AsyncSession, list_id: uuid.UUID) -> Row:
    """The list, which cannot be deleted until this transaction ends (ListNotFound if absent)."""
    return await _lock_list(session, list_id, for_update=False)


async def lock_contacts(session: AsyncSession, contact_ids: Sequence[uuid.UUID]) -> None:
    """Lock many contacts in one consistent order, so two overlapping batches cannot deadlock."""
    await locks.lock_contacts(session, contact_ids)


# ---- public links ----------------------------------------------------------------------------------------


async def link_target(session: AsyncSession, link: Link) -> dict[str, Any]:
    """What a link points at, for the page shown before anything changes: list name and membership status.

    The status is that of the contact the link acts on now (its own, or its survivor's after a merge).
    """
    return await _target(session, await _follow(session, link))


async def confirm(session: AsyncSession, link: Link, *, ip: str | None, user_agent: str | None) -> dict[str, Any]:
    """Double opt-in click: pending → subscribed and a `confirmed` ledger event. A replay changes nothing.

    After a merge the survivor holds the pending membership, so it is the survivor that confirms.
    """
    try:
        link = await _lock_holder(session, link)
    except ContactNotFound:
        raise ConfirmationCancelled("this subscription no longer exists") from None
    current = await memberships.get(session, link.list_id, link.contact_id, lock=True)
    target = await _target(session, link)
    if current is not None and current["status"] == memberships.SUBSCRIBED:
        return {**target, "result": "already_confirmed"}
    if current is None or current["status"] != memberships.PENDING:
        raise ConfirmationCancelled("this subscription was cancelled or unsubscribed since the email was sent")
    now = utc_now()
    await consents.grant_from_signup(session, current)  # a public signup's consent counts from now on
    await consents.append(
        session, link.contact_id, purpose=consents.MARKETING, action=ConsentAction.CONFIRMED.value,
        source="double_opt_in", occurred_at=now, proof={"ip": ip, "user_agent": user_agent},
        recorded_by=CONFIRMED_BY, list_id=link.list_id,
    )
    row = await memberships.confirm(session, link.list_id, link.contact_id, at=now)
    return {**target, "status": row["status"], "result": "confirmed"}


async def unsubscribe_by_link(
    session: AsyncSession, link: Link, *, everything: bool, ip: str | None, user_agent: str | None
) -> dict[str, Any]:
    """One-click unsubscribe: that list, or with `everything` withdraw email_marketing (= every list).

    It acts on the contact that holds the person now: the one the link names, or the survivor it was merged
    into (which holds its memberships and consents). An erased contact has nothing left to unsubscribe.
    """
    try:
        link = await _lock_holder(session, link)
    except ContactNotFound:
        return {"list": None, "status": None, "unsubscribed_lists": 0}  # nothing left to unsubscribe
    now = utc_now()
    if everything:
        changed = await withdraw_marketing(session, link.contact_id, source="one_click_unsubscribe",
                                           proof={"ip": ip, "user_agent": user_agent}, recorded_by=UNSUBSCRIBED_BY,
                                           reason="one_click_all")
    else:
        rows = await memberships.unsubscribe(session, link.contact_id, list_id=link.list_id, at=now,
                                             reason="one_click")
        changed = len(rows)
        if changed:  # on the ledger too, with its proof; a replay stacks nothing
            await consents.append_list_withdrawal(
                session, link.contact_id, link.list_id, source="one_click_unsubscribe",
                proof={"ip": ip, "user_agent": user_agent}, recorded_by=UNSUBSCRIBED_BY, at=now)
    target = await _target(session, link)
    return {**target, "unsubscribed_lists": changed}


async def withdraw_marketing(
    session: AsyncSession, contact_id: uuid.UUID, *, source: str, proof: Mapping[str, Any], recorded_by: str,
    reason: str,
) -> int:
    """Unsubscribe from everything (the contact locked by the caller): every list, and email_marketing withdrawn
    unless it already is (a replay stacks nothing). Returns how many memberships changed."""
    now = utc_now()
    changed = await memberships.unsubscribe(session, contact_id, list_id=None, at=now, reason=reason)
    state = await consents.marketing_state(session, contact_id)
    if state.granted or state.since is None:
        await consents.append(
            session, contact_id, purpose=consents.MARKETING, action=ConsentAction.WITHDRAWN.value, source=source,
            occurred_at=now, proof=proof, recorded_by=recorded_by,
        )
    return len(changed)


async def follow_link(session: AsyncSession, link: Link) -> Link:
    """The link aimed at the contact that holds its person now (merges followed); unchanged once erased."""
    return await _follow(session, link)


async def lock_link_holder(session: AsyncSession, link: Link) -> Link:
    """As follow_link, with that contact locked; ContactNotFound once the person was erased."""
    return await _lock_holder(session, link)


async def public_face(session: AsyncSession, list_id: uuid.UUID) -> Row | None:
    """How a list shows itself on public pages: name, display name and colour (None once deleted)."""
    return (await session.execute(
        select(_lists.c.id, _lists.c.name, _lists.c.display_name, _lists.c.color).where(_lists.c.id == list_id)
    )).mappings().first()


async def _target(session: AsyncSession, link: Link) -> dict[str, Any]:
    row = (await session.execute(
        select(_lists.c.id, _lists.c.name, _members.c.status)
        .select_from(_lists.outerjoin(_members, (_members.c.list_id == _lists.c.id)
                                      & (_members.c.contact_id == link.contact_id)))
        .where(_lists.c.id == link.list_id)
    )).mappings().first()
    return {"list": {"id": row["id"], "name": row["name"]} if row else None,
            "status": row["status"] if row else None}


async def _follow(session: AsyncSession, link: Link) -> Link:
    """The link as it acts now: on its own contact, or, if that contact was merged away, on the survivor
    (`contact_merge`, merges of merges followed). An erased contact has no survivor: the link is unchanged."""
    if await session.scalar(select(_contacts.c.id).where(_contacts.c.id == link.contact_id)) is not None:
        return link
    survivor = await survivor_of(session, link.contact_id)
    return link if survivor is None else replace(link, contact_id=survivor)


async def _lock_holder(session: AsyncSession, link: Link) -> Link:
    """Lock the contact the link acts on now (see `_follow`) and return the link aimed at it.

    ContactNotFound when the person was erased (merged or not). A merge that commits while this waits for
    the lock deletes the row waited for: the link then follows that merge too.
    """
    holder = await locks.lock_following_merges(session, link.contact_id)
    if holder is None:
        raise ContactNotFound(f"no contact with id {link.contact_id}")
    return replace(link, contact_id=holder)


# ---- helpers ---------------------------------------------------------------------------------------------


def _with_counts() -> Any:
    """Lists with their membership counts, one index-served aggregate per list (LATERAL)."""
    counts = (
        select(
            func.count().filter(_members.c.status == memberships.SUBSCRIBED).label("subscribed"),
            func.count().filter(_members.c.status == memberships.PENDING).label("pending"),
            func.count().filter(_members.c.status == memberships.UNSUBSCRIBED).label("unsubscribed"),
        )
        .where(_members.c.list_id == _lists.c.id)
        .lateral("counts")
    )
    return select(*_lists.c, counts.c.subscribed, counts.c.pending, counts.c.unsubscribed).select_from(
        _lists.join(counts, true())
    )


async def _lock_list(session: AsyncSession, list_id: uuid.UUID, *, for_update: bool) -> Row:
    """Read a list; FOR UPDATE to change it, else FOR KEY SHARE so it cannot vanish mid-subscription."""
    query = select(*_lists.c).where(_lists.c.id == list_id)
    query = query.with_for_update() if for_update else query.with_for_update(read=True, key_share=True)
    row = (await session.execute(query)).mappings().first()
    if row is None:
        raise ListNotFound(f"no list with id {list_id}")
    return row


def _check_public_signup(values: Mapping[str, Any]) -> None:
    """A list open to browser signups says what people agree to (the proof's wording) and from where."""
    if not values["public_signup"]:
        return
    errors = []
    if not values["signup_wording"]:
        errors.append(FieldError("signup_wording", "required when public_signup is true: the consent text shown "
                                 "on the form, kept as the proof's wording", "required"))
    if not values["signup_origins"]:
        errors.append(FieldError("signup_origins", "required when public_signup is true: the origins of the "
                                 "shop's pages that show the form", "required"))
    if errors:
        raise InvalidInput(*errors)


def _check_version(current: Row, expected_version: int | None) -> None:
    if expected_version is not None and current["version"] != expected_version:
        raise PreconditionFailed(f"the list is at version {current['version']}", current_version=current["version"])


# A refusal names stored facts only to a token that may read them (docs/security.md, class 11): the refusal's code
# says what to fix; the contact's email_status and kind are contacts:read's, the list's kinds and the date a member
# left lists:read's, the date of a withdrawal consents:read's.
def _check_mailable(contact: Row, actor: Principal) -> None:
    if contact["email"] is None:
        raise InvalidInput.one("contact.email", "the contact has no email address", "email_missing")
    if not consents.mailable(contact):
        status = contact["email_status"] if actor.reads(Scope.CONTACTS_READ) else "undeliverable"
        raise InvalidInput.one("contact.email", f"the address is {status}: it cannot be subscribed",
                               "email_undeliverable")


def _kind_refused(accepted: Sequence[str], kind: str, actor: Principal) -> str:
    takes = f"accepts {', '.join(accepted)}" if actor.reads(Scope.LISTS_READ) else "does not accept"
    holder = f"a {kind}" if actor.reads(Scope.CONTACTS_READ) else "of another kind"
    return f"this list {takes}; the contact is {holder}"


async def _check_consent(session: AsyncSession, contact_id: uuid.UUID, current: Row | None, actor: Principal) -> None:
    """A current email_marketing grant, dated after any unsubscribe from this list."""
    state = await consents.marketing_state(session, contact_id)
    if not state.granted:
        if not actor.reads(Scope.CONSENTS_READ):
            raise consents.ConsentRequired(_CONSENT_DUE)
        if state.since is None:
            raise consents.ConsentRequired(
                "no email_marketing consent on the ledger: send one in `consent` or record it first"
            )
        raise consents.ConsentRequired(
            f"email_marketing was withdrawn at {rfc3339(state.since)}: a consent dated after that is needed",
            withdrawn_at=rfc3339(state.since),
        )
    if current is not None and current["status"] != memberships.SUBSCRIBED:  # left, or left then asked again
        left_at = current["unsubscribed_at"]
        if left_at is not None and (state.last_grant_at is None or state.last_grant_at <= left_at):
            if not actor.reads(Scope.LISTS_READ):
                raise consents.ConsentRequired(_CONSENT_DUE)
            raise consents.ConsentRequired(
                f"the contact unsubscribed from this list at {rfc3339(left_at)}: a consent dated after that "
                "is needed", unsubscribed_at=rfc3339(left_at),
            )


# What a token that may not read the ledger or the membership learns: a fresh consent is due, not why or since when.
_CONSENT_DUE = ("a current email_marketing consent is needed: send one in `consent` (one dated now lifts any earlier "
                "refusal)")


def rfc3339(moment: datetime) -> str:
    """The wire form of a timestamp (as pydantic writes it): UTC with a Z."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def _id_of(session: AsyncSession, name: str) -> str | None:
    found = await session.scalar(select(_lists.c.id).where(_lists.c.name == name))
    return str(found) if found else None

