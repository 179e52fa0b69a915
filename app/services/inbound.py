"""What the emailing tools tell us back: unsubscribes, complaints, bounces, address changes, confirmations.

Each vendor payload is first read into `InboundEvent`s (pure parsing, testable without a database), then
applied as state changes that are no-ops when the state already holds — so a replayed delivery, or the
vendor echoing a change we pushed ourselves, changes nothing and writes no outbox row (no ping-pong).
Profile edits made in the vendor's UI are not taken back: Carnet is the source of truth for profiles.

A destination's inbound secret speaks for one vendor account, which may be hostile (docs/security.md, class 10):
an event acts only on a person that destination was given (`_given_to`) and only on the lists it maps, and
nothing in the answer depends on what Carnet holds (the router reports only what it read from the payload).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import AppError
from app.logging import get_logger
from app.models import Contact, ListMembership, SyncLink
from app.models.base import utc_now
from app.schemas.consents import ConsentAction
from app.schemas.freeform import unstorable_text
from app.schemas.types import normalize_email
from app.security import Principal, Role
from app.services import consents, locks, memberships
from app.services import contacts as contacts_service

__all__ = [
    "InboundEvent",
    "apply",
    "mailchimp_signature",
    "parse_brevo",
    "parse_mailchimp",
]

log = get_logger("carnet.inbound")
_contacts = Contact.__table__  # type: ignore[attr-defined]
_links = SyncLink.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
VIA = "inbound_sync"

Kind = Literal["unsubscribe", "complaint", "bounce", "subscribe", "email_changed"]


@dataclass(frozen=True, slots=True)
class InboundEvent:
    kind: Kind
    email: str
    remote_list_ids: tuple[str, ...] = ()      # empty: every mapped list (a global unsubscribe)
    new_email: str | None = None
    vendor_event: str = ""                     # the vendor's own name for it, kept in proofs


# ---- Mailchimp: form-encoded `type=...&data[email]=...` ----------------------------------------------------


def _usable(events: list[InboundEvent]) -> list[InboundEvent]:
    """Events whose addresses PostgreSQL can hold: one with a NUL or a lone surrogate can match no contact and
    must not reach the database (a 500); it is dropped, as an event about an unknown address is ignored."""
    return [e for e in events if not unstorable_text(e.email) and not unstorable_text(e.new_email or "")]


def parse_mailchimp(form: Mapping[str, str]) -> list[InboundEvent]:
    return _usable(_parse_mailchimp(form))


def _parse_mailchimp(form: Mapping[str, str]) -> list[InboundEvent]:
    kind = form.get("type", "")
    lists = tuple(filter(None, [form.get("data[list_id]")]))
    email = (form.get("data[email]") or "").strip().lower()
    reason = form.get("data[reason]", "")
    if kind == "unsubscribe" and email:
        events = [InboundEvent("unsubscribe", email, lists, vendor_event="unsubscribe")]
        if reason == "abuse":
            events.append(InboundEvent("complaint", email, lists, vendor_event="unsubscribe:abuse"))
        return events
    if kind == "cleaned" and email:
        return [InboundEvent("complaint" if reason == "abuse" else "bounce", email, lists,
                             vendor_event=f"cleaned:{reason or 'hard'}")]
    if kind == "subscribe" and email:
        return [InboundEvent("subscribe", email, lists, vendor_event="subscribe")]
    if kind == "upemail":
        old, new = (form.get("data[old_email]") or "").strip().lower(), (form.get("data[new_email]") or "").strip()
        if old and new:
            return [InboundEvent("email_changed", old, lists, new_email=new, vendor_event="upemail")]
    return []  # profile, campaign and anything newer: nothing for Carnet to take back


def mailchimp_signature(key: str, url: str, form: Iterable[tuple[str, str]]) -> str:
    """Mailchimp's webhook signature: base64 HMAC-SHA1 of the URL followed by each key+value, keys sorted."""
    message = url + "".join(k + v for k, v in sorted(form))
    return base64.b64encode(hmac.new(key.encode(), message.encode(), hashlib.sha1).digest()).decode()


# ---- Brevo: JSON, one event or a batch ----------------------------------------------------------------------

_BREVO_KINDS: dict[str, Kind] = {
    "unsubscribe": "unsubscribe", "unsubscribed": "unsubscribe",
    "spam": "complaint", "complaint": "complaint",
    "hard_bounce": "bounce", "hardbounce": "bounce",
    "list_addition": "subscribe", "listaddition": "subscribe",
}


def parse_brevo(body: Any) -> list[InboundEvent]:
    items = body if isinstance(body, list) else [body]
    events = []
    for item in items:
        if not isinstance(item, dict):
            continue
        name = str(item.get("event", ""))
        kind = _BREVO_KINDS.get(name.lower())
        email = item.get("email")
        if kind is None or not isinstance(email, str) or not email.strip():
            continue
        raw_lists = item.get("list_id", item.get("listId", []))
        lists = tuple(str(x) for x in (raw_lists if isinstance(raw_lists, list) else [raw_lists]) if x is not None)
        events.append(InboundEvent(kind, email.strip().lower(), lists, vendor_event=name))
    return _usable(events)


# ---- applying -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Here:
    """The destination an event came through: what it maps, and who acts in its name."""

    destination_id: uuid.UUID
    by_remote: Mapping[str, Mapping[str, Any]]   # remote list id -> its list mapping
    segment_only: frozenset[str]                 # remote lists a synced segment fills and no Carnet list does
    actor: Principal
    vendor: str

    @property
    def mapped_lists(self) -> list[uuid.UUID]:
        return [uuid.UUID(m["list_id"]) for m in self.by_remote.values()]


async def apply(
    session: AsyncSession, destination: Mapping[str, Any], events: Sequence[InboundEvent], *, vendor: str
) -> None:
    """Apply each event in its own savepoint: one the data cannot take (say, an address now held by another
    contact) is skipped and logged, the others go through. Returns nothing on purpose: whether an event changed
    anything, or found anyone, must not reach the sender (an address oracle)."""
    by_remote = {m["remote_list_id"]: m for m in destination["list_mappings"]}
    # A Mailchimp segment is a tag inside a mapped audience: leaving that audience is an ordinary unsubscribe from
    # its Carnet list, not a withdrawal of consent (which would reach every list, mapped here or not).
    segment_only = frozenset(m.get("remote_list_id") for m in destination.get("segment_mappings") or ()
                             if m.get("remote_list_id")) - by_remote.keys()
    here = _Here(destination["id"], by_remote, segment_only, vendor=vendor, actor=Principal(
        f"inbound:{vendor}", Role.INTEGRATION, frozenset(), f"destination:{destination['id']}"))
    changed = 0
    # The people the events name, locked at once in id order (in the mode an address change needs, if any): each
    # event then finds its contact locked, and two batches naming the same people in another order queue instead
    # of each holding one the other waits for (docs/operations.md, "Locking rules"). Stored addresses are
    # lower-cased (schemas.types.normalize_email), so the unique index answers these lookups.
    emails = sorted({event.email for event in events})
    named = await session.scalars(select(_contacts.c.id).where(_contacts.c.email.in_(emails)))
    await locks.lock_contacts(session, named, key_change=any(e.kind == "email_changed" for e in events))
    for event in events:
        contact_id = await session.scalar(select(_contacts.c.id).where(_contacts.c.email == event.email))
        if contact_id is None:
            continue
        try:
            async with session.begin_nested():
                changed += await _apply_one(session, contact_id, event, here)
        except AppError as exc:
            log.info("inbound.skipped", vendor=vendor, kind=event.kind, reason=exc.slug)
    # For the operator only (counts, no addresses): the sender's answer says none of this.
    log.info("inbound.applied", vendor=vendor, destination_id=str(here.destination_id), events=len(events),
             changed=changed)


async def _given_to(session: AsyncSession, here: _Here, contact_ids: Iterable[uuid.UUID]) -> bool:
    """Whether the destination was given this person: it holds a remote record of them (a `sync_link`, which
    every push writes — list members and consenting segment members alike), or they have a membership in one of
    its mapped lists that dispatch and resync send it (pushed, or owed a push): subscribed or unsubscribed, or
    pending where the vendor runs the double opt-in. A membership pending on Carnet's own confirmation is never
    sent (delivery._wanted_lists), and anyone can make one with the public signup form: it gives nobody to the
    vendor. A synced segment's snapshot alone is not enough either: a member without consent is never sent."""
    ids = list(contact_ids)
    linked = exists().where(_links.c.destination_id == here.destination_id, _links.c.contact_id.in_(ids))
    vendor_confirms = [uuid.UUID(m["list_id"]) for m in here.by_remote.values() if m.get("double_opt_in")]
    member = exists().where(_members.c.contact_id.in_(ids), _members.c.list_id.in_(here.mapped_lists),
                            or_(_members.c.status != memberships.PENDING, _members.c.list_id.in_(vendor_confirms)))
    return bool(await session.scalar(select(or_(linked, member))))


async def _apply_one(session: AsyncSession, contact_id: uuid.UUID, event: InboundEvent, here: _Here) -> bool:
    # Locked in the mode the change needs (an address change may take the email: FOR UPDATE at once); a contact
    # merged away since it was found by its address is followed to its survivor, which holds the person's lists
    # and consents. What is said of the address itself (bounced, complained, changed) only applies where the
    # address went: a survivor that kept its own address is not the one that bounced, and neither is a contact
    # whose address was changed since it was found by it (read again under the lock: a vendor's "a@ is now c@"
    # must not overwrite the b@ the shop gave it meanwhile).
    holder = await locks.lock_following_merges(session, contact_id, key_change=event.kind == "email_changed")
    if holder is None:
        return False  # erased meanwhile: nothing left to change
    # Checked under the lock: a vendor acts only on the people it was given, whatever address it names.
    if not await _given_to(session, here, {contact_id, holder}):
        return False
    same_address = (await contacts_service.get(session, holder))["email"] == event.email
    if event.kind in ("bounce", "email_changed") and not same_address:
        return False
    contact_id = holder
    now = utc_now()
    actor, vendor, by_remote = here.actor, here.vendor, here.by_remote
    list_ids = [uuid.UUID(by_remote[r]["list_id"]) for r in event.remote_list_ids if r in by_remote] \
        if event.remote_list_ids else here.mapped_lists
    if event.kind == "unsubscribe":
        changed = [row for list_id in list_ids for row in await memberships.unsubscribe(
            session, contact_id, list_id=list_id, at=now, reason=f"{vendor}:{event.vendor_event}")]
        if here.segment_only.intersection(event.remote_list_ids):
            # A synced segment's Brevo list is no subscription: the person was sent its campaigns on their
            # email_marketing consent alone, so leaving it withdraws that consent (else the next push would
            # put them back, and lift the vendor's opt-out).
            changed.append(await _withdraw_marketing(session, contact_id, actor=actor, vendor=vendor, event=event,
                                                     at=now, why="unsubscribed from a synced segment's list"))
        return any(changed)
    if event.kind == "complaint":
        before = await contacts_service.get(session, contact_id)
        if same_address:
            await contacts_service.set_delivery_facts(session, contact_id, actor=actor, via=VIA,
                                                      email_status="complained")
        withdrawn = await _withdraw_marketing(session, contact_id, actor=actor, vendor=vendor, event=event, at=now,
                                              why="reported a spam complaint")
        return withdrawn or (same_address and before["email_status"] != "complained")
    if event.kind == "bounce":
        before = await contacts_service.get(session, contact_id)
        await contacts_service.set_delivery_facts(session, contact_id, actor=actor, via=VIA, email_status="bounced")
        return before["email_status"] != "bounced"
    if event.kind == "email_changed":
        try:
            new_email = normalize_email(event.new_email or "")
        except ValueError:
            return False
        before = await contacts_service.get(session, contact_id)
        after = await contacts_service.set_delivery_facts(session, contact_id, actor=actor, via=VIA, email=new_email)
        return after["email"] != before["email"]
    return await _confirm_vendor_double_opt_in(session, contact_id, event, by_remote, vendor=vendor, at=now)


async def _withdraw_marketing(
    session: AsyncSession, contact_id: uuid.UUID, *, actor: Principal, vendor: str, event: InboundEvent, at: datetime,
    why: str,
) -> bool:
    state = await consents.marketing_state(session, contact_id)
    if not state.granted and state.since is not None:
        return False  # already withdrawn: a replay does not stack withdrawals
    await consents.append(
        session, contact_id, purpose=consents.MARKETING, action=ConsentAction.WITHDRAWN.value,
        source=f"{vendor}_{event.kind}", occurred_at=at,
        proof={"vendor": vendor, "wording": f"{vendor}: {why} ({event.vendor_event})"},
        recorded_by=actor.subject,
    )
    return True


async def _confirm_vendor_double_opt_in(
    session: AsyncSession, contact_id: uuid.UUID, event: InboundEvent, by_remote: Mapping[str, Mapping[str, Any]],
    *, vendor: str, at: datetime,
) -> bool:
    """The vendor ran the double opt-in (destination setting) and says the person confirmed."""
    confirmed = False
    for remote in event.remote_list_ids:
        mapping = by_remote.get(remote)
        if mapping is None or not mapping.get("double_opt_in"):
            continue  # a subscription made at the vendor without Carnet's consent rules is not taken back
        list_id = uuid.UUID(mapping["list_id"])
        current = await memberships.get(session, list_id, contact_id, lock=True)
        if current is None or current["status"] != memberships.PENDING:
            continue
        await consents.grant_from_signup(session, current)
        await consents.append(
            session, contact_id, purpose=consents.MARKETING, action=ConsentAction.CONFIRMED.value,
            source=f"{vendor}_double_opt_in", occurred_at=at,
            proof={"vendor": vendor,
                   "wording": f"confirmed through {vendor}'s double opt-in ({event.vendor_event}, list {remote})"},
            recorded_by=f"inbound:{vendor}",
        )
        await memberships.confirm(session, list_id, contact_id, at=at)
        confirmed = True
    return confirmed
