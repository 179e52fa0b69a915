"""Merging a duplicate contact into the one that survives, in the caller's transaction.

`merge(survivor, duplicate)` (docs/api.md "Merging contacts"):

1. both rows are locked (in id order, so two crossing merges cannot deadlock); a missing row is a 404,
   or a 409 naming the survivor when `contact_merge` says it was merged away;
2. orders, events, history rows and consent events move to the survivor. The consent ledger is
   append-only (a trigger); its one merge exception lets `contact_id` change from the duplicate to the
   survivor while this transaction has set `carnet.merging` to `<duplicate>:<survivor>` (migration 0007),
   and the flag is cleared right after;
3. list memberships move; where both were on a list, the person's latest decision wins
   (`_duplicate_wins`); then the survivor's consent state is derived again from its merged ledger: a purpose
   that flipped is announced, and without a current email_marketing grant every membership is unsubscribed
   (`_follow_the_ledger`);
4. the duplicate leaves its synced segments (`segment_sync.leave_all`); a survivor that takes its address takes
   the vendors' record of it first: its link and its places in their segment snapshots; the duplicate row is
   deleted, then the survivor takes its empty fields from it (email and external_id included, now free), the
   union of tags, missing attribute keys, the earlier first contact; its stats and lifecycle stage are recomputed
   from the orders it now holds;
5. `contact_merge` records it; history rows (via "merge") and outbox messages (`contact.merged` for the
   duplicate's id; `consent.*`, `membership.*`, `segment.*` (its place in each synced segment, restated) and
   `contact.updated` for the survivor) go in the same transaction.

Logs carry ids and counts only.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, ContactNotFound, InvalidInput, PreconditionFailed
from app.logging import get_logger
from app.models import Cart, ConsentEvent, Contact, ContactHistory, ContactMerge, Event, ListMembership, Order
from app.models.base import utc_now
from app.security import Principal
from app.services import consents, delivery, history, journal, memberships, outbox, segment_sync
from app.services.consents import PurposeState
from app.services.locks import survivor_of
from app.services.orders import LifecyclePolicy, refresh_stats

__all__ = ["ContactAlreadyMerged", "Merged", "merge"]

log = get_logger("carnet.merge")

_t = Contact.__table__  # type: ignore[attr-defined]
_orders = Order.__table__  # type: ignore[attr-defined]
_carts = Cart.__table__  # type: ignore[attr-defined]
_events = Event.__table__  # type: ignore[attr-defined]
_history = ContactHistory.__table__  # type: ignore[attr-defined]
_ledger = ConsentEvent.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_merges = ContactMerge.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]

# Columns the survivor takes from the duplicate when its own is empty (wire name → column).
_FILLED = {
    "external_id": "external_id", "email": "email", "phone": "phone", "first_name": "first_name",
    "last_name": "last_name", "company": "company", "job_title": "job_title", "sector": "sector",
    "gender": "gender", "birth_date": "birth_date", "language": "language", "source": "source",
}
# The address moves as a block (only into a survivor without any address): never half of each.
_ADDRESS = {"address.line1": "address_line1", "address.line2": "address_line2",
            "address.postal_code": "postal_code", "address.city": "city", "address.region": "region",
            "address.country": "country"}
_DECIDED = ("subscribed", "unsubscribed")


class ContactAlreadyMerged(Conflict):
    slug, title = "contact-already-merged", "This contact was merged into another one"


@dataclass(frozen=True, slots=True)
class Merged:
    survivor: Row
    merged_id: uuid.UUID
    merged_at: datetime
    moved: dict[str, int]


async def merge(
    session: AsyncSession,
    survivor_id: uuid.UUID,
    duplicate_id: uuid.UUID,
    *,
    actor: Principal,
    policy: LifecyclePolicy,
    expected_version: int | None = None,
) -> Merged:
    """Merge `duplicate_id` into `survivor_id` (see the module docstring); `expected_version` is the survivor's."""
    if survivor_id == duplicate_id:
        raise InvalidInput.one("duplicate_id", "a contact cannot be merged with itself", "same_contact")
    locked = {r["id"]: r for r in (await session.execute(
        select(*_t.c).where(_t.c.id.in_((survivor_id, duplicate_id))).order_by(_t.c.id).with_for_update()
    )).mappings()}
    survivor, duplicate = locked.get(survivor_id), locked.get(duplicate_id)
    if survivor is None:
        await _refuse_missing(session, survivor_id, what="contact")
    if duplicate is None:
        await _refuse_missing(session, duplicate_id, what="duplicate")
    assert survivor is not None and duplicate is not None
    if expected_version is not None and survivor["version"] != expected_version:
        raise PreconditionFailed(f"the contact is at version {survivor['version']}",
                                 current_version=survivor["version"])

    now = utc_now()
    consents_before, lists_before = await _consent_states(session, survivor_id), await _lists(session, survivor_id)
    moved = {
        "orders": await _repoint(session, _orders, duplicate_id, survivor_id),
        "carts": await _repoint(session, _carts, duplicate_id, survivor_id),
        "events": await _repoint(session, _events, duplicate_id, survivor_id),
        "history": await _repoint(session, _history, duplicate_id, survivor_id),
        "consents": await _move_consents(session, duplicate_id, survivor_id),
        "memberships": await _move_memberships(session, duplicate_id, survivor_id, now=now),
    }
    lists_changed = await _follow_the_ledger(session, survivor_id, consents_before, lists_before, now=now)
    changes = _fills(survivor, duplicate)
    if "email" in changes:
        # The survivor takes the duplicate's address, and with it the vendors' record of it: that record's link, and
        # its places in those vendors' segment snapshots (restated below), so its push corrects what it is in.
        taken = await delivery.hand_over_links(session, duplicate_id, survivor_id)
        await segment_sync.carry(session, duplicate_id, survivor_id, taken)
    # Its synced segments hear it leave; the survivor's place in each is restated once it is merged (below).
    await segment_sync.leave_all(session, [duplicate_id], reason="merged", survivor_id=survivor_id)
    await session.execute(delete(_t).where(_t.c.id == duplicate_id))  # frees its email and external_id

    row = survivor
    if changes:
        row = (await session.execute(
            update(_t).where(_t.c.id == survivor_id)
            .values(**changes, version=_t.c.version + 1, updated_at=now).returning(*_t.c)
        )).mappings().one()
    await history.record(
        session, survivor_id,
        [("merged_contact", None, str(duplicate_id)), *_merged_identity(duplicate), *_wire_changes(survivor, row)],
        actor=actor, via="merge",
    )
    if moved["orders"]:
        await refresh_stats(session, survivor_id, actor=actor, policy=policy, field="duplicate_id")
    await session.execute(insert(_merges).values(
        merged_id=duplicate_id, survivor_id=survivor_id, merged_at=now, subject=actor.subject))
    # The refs say who (survivor first): a contact id in `detail` would outlive the person's erasure (hashed there).
    await journal.record(session, journal.act(actor, "contacts.merged", refs=[str(survivor_id), str(duplicate_id)]))
    # The duplicate's address is retired when the survivor keeps another one: destinations then remove its
    # remote record (else the person gets every campaign twice). Taken over, the record becomes the survivor's.
    retired = duplicate["email"] is not None and duplicate["email"] != row["email"]
    await outbox.add(session, "contact.merged", contact_id=duplicate_id,
                     payload={"survivor_id": str(survivor_id), "merged_id": str(duplicate_id),
                              "address_retired": retired})
    # Now that it holds what it merged (tags, orders, consents, lists): where it stands in every synced segment.
    await segment_sync.restate(session, survivor_id, merged_id=duplicate_id, now=now)
    fields = sorted({field for field, _old, _new in _wire_changes(survivor, row)}
                    | ({"stats"} if moved["orders"] else set())
                    | ({"lists"} if moved["memberships"] or lists_changed else set()))
    await outbox.add(session, "contact.updated", contact_id=survivor_id,
                     payload={"contact_id": str(survivor_id), "fields": fields, "merged_id": str(duplicate_id)})
    final = (await session.execute(select(*_t.c).where(_t.c.id == survivor_id))).mappings().one()
    log.info("contact.merged", survivor_id=str(survivor_id), merged_id=str(duplicate_id), subject=actor.subject,
             **moved)
    return Merged(survivor=final, merged_id=duplicate_id, merged_at=now, moved=moved)


# ---- steps ---------------------------------------------------------------------------------------------


async def _refuse_missing(session: AsyncSession, contact_id: uuid.UUID, *, what: str) -> None:
    survivor = await survivor_of(session, contact_id)
    if survivor is not None:
        raise ContactAlreadyMerged(f"the {what} {contact_id} was already merged into {survivor}",
                                   survivor_id=str(survivor))
    raise ContactNotFound(f"no {what} with id {contact_id}")


async def _repoint(session: AsyncSession, table: Any, duplicate_id: uuid.UUID, survivor_id: uuid.UUID) -> int:
    result = await session.execute(
        update(table).where(table.c.contact_id == duplicate_id).values(contact_id=survivor_id))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def _move_consents(session: AsyncSession, duplicate_id: uuid.UUID, survivor_id: uuid.UUID) -> int:
    """The one UPDATE the ledger's trigger allows a merge, while `carnet.merging` names this pair (then off)."""
    await session.execute(text("SELECT set_config('carnet.merging', :pair, true)"),
                          {"pair": f"{duplicate_id}:{survivor_id}"})
    moved = await _repoint(session, _ledger, duplicate_id, survivor_id)
    await session.execute(text("SELECT set_config('carnet.merging', '', true)"))
    return moved


async def _move_memberships(
    session: AsyncSession, duplicate_id: uuid.UUID, survivor_id: uuid.UUID, *, now: datetime
) -> int:
    """Lists only the duplicate was on move as they are; on shared lists the latest decision wins."""
    rows = list((await session.execute(
        select(_members).where(_members.c.contact_id.in_((duplicate_id, survivor_id))).with_for_update()
    )).mappings())
    kept = {r["list_id"]: r for r in rows if r["contact_id"] == survivor_id}
    theirs = [r for r in rows if r["contact_id"] == duplicate_id]
    for row in theirs:
        mine = kept.get(row["list_id"])
        if mine is not None and _duplicate_wins(mine, row):
            won = row if row["status"] in _DECIDED else {  # the unsubscribe a pending request left standing
                **row, "status": "unsubscribed", "pending_since": None, "pending_proof": None}
            await session.execute(
                update(_members).where(_members.c.list_id == row["list_id"], _members.c.contact_id == survivor_id)
                .values(status=won["status"], source=won["source"], subscribed_at=won["subscribed_at"],
                        unsubscribed_at=won["unsubscribed_at"], pending_since=won["pending_since"],
                        pending_proof=won["pending_proof"], updated_at=now))
    shared = [r["list_id"] for r in theirs if r["list_id"] in kept]
    if shared:
        await session.execute(delete(_members).where(_members.c.contact_id == duplicate_id,
                                                     _members.c.list_id.in_(shared)))
    if len(theirs) > len(shared):
        await session.execute(update(_members).where(_members.c.contact_id == duplicate_id)
                              .values(contact_id=survivor_id, updated_at=now))
    return len(theirs)


async def _follow_the_ledger(
    session: AsyncSession, survivor_id: uuid.UUID, consents_before: Mapping[str, PurposeState],
    lists_before: Mapping[uuid.UUID, str], *, now: datetime,
) -> bool:
    """The ledger moved: derive the survivor's state from it again, as appending those events would have.

    Each purpose whose state flipped is announced (`consent.granted`, `consent.withdrawn`); without a current
    email_marketing grant, every membership is unsubscribed (the duplicate's withdrawal may be the person's
    latest decision); each list whose status changed on the survivor is announced (`membership.*`), so the
    emailing tools hear what the merge decided. Whether any list changed.
    """
    consents_after = await _consent_states(session, survivor_id)
    for purpose in sorted(consents_before.keys() | consents_after.keys()):
        granted = consents_after.get(purpose, PurposeState()).granted
        if granted != consents_before.get(purpose, PurposeState()).granted:
            await outbox.add(session, "consent.granted" if granted else "consent.withdrawn", contact_id=survivor_id,
                             payload={"contact_id": str(survivor_id), "purpose": purpose})
    marketing = consents_after.get(consents.MARKETING)
    told: set[uuid.UUID] = set()
    if marketing is not None and not marketing.granted:
        told = {r["list_id"] for r in await memberships.unsubscribe(
            session, survivor_id, list_id=None, at=now, reason="consent_withdrawn")}
    lists_after = await _lists(session, survivor_id)
    for list_id, status in lists_after.items():
        if list_id not in told and status != lists_before.get(list_id) and status in _DECIDED:
            await outbox.add(session, f"membership.{status}", contact_id=survivor_id,
                             payload={"list_id": str(list_id), "contact_id": str(survivor_id), "reason": "merge"})
    return lists_after != lists_before


async def _consent_states(session: AsyncSession, contact_id: uuid.UUID) -> dict[str, PurposeState]:
    rows = await session.execute(
        select(_ledger.c.purpose, _ledger.c.action, _ledger.c.occurred_at)
        .where(_ledger.c.contact_id == contact_id).order_by(_ledger.c.occurred_at, _ledger.c.id))
    return consents.fold(rows.mappings())


async def _lists(session: AsyncSession, contact_id: uuid.UUID) -> dict[uuid.UUID, str]:
    rows = await session.execute(
        select(_members.c.list_id, _members.c.status).where(_members.c.contact_id == contact_id))
    return {row.list_id: row.status for row in rows}


def _duplicate_wins(mine: Row, theirs: Row) -> bool:
    """On a list both contacts were on: the person's latest decision (subscribe/unsubscribe) wins.

    A decision beats `pending` (not a decision yet); two decisions compare their dates, and at equal or
    unknown dates `unsubscribed` wins (when in doubt, do not mail). Otherwise the survivor's row stays.
    A pending request made after leaving the list (a public signup nobody confirmed: anyone can type an address)
    leaves that unsubscribe standing: it is still the person's latest decision (memberships.put keeps it).
    """
    theirs_decided, mine_decided = _decision(theirs), _decision(mine)
    if theirs_decided is None:
        return False
    if mine_decided is None:
        return True
    (mine_status, mine_at), (theirs_status, theirs_at) = mine_decided, theirs_decided
    if mine_at is not None and theirs_at is not None and mine_at != theirs_at:
        return theirs_at > mine_at
    return theirs_status == "unsubscribed" and mine_status == "subscribed"


def _decision(row: Row) -> tuple[str, datetime | None] | None:
    """(status, when) of the person's latest decision on this membership; None: they never decided."""
    if row["status"] == "subscribed":
        return "subscribed", row["subscribed_at"]
    if row["status"] == "unsubscribed" or row["unsubscribed_at"] is not None:
        return "unsubscribed", row["unsubscribed_at"]
    return None


def _fills(survivor: Row, duplicate: Row) -> dict[str, Any]:
    """Column values the survivor takes from the duplicate."""
    changes: dict[str, Any] = {}
    for column in _FILLED.values():
        if survivor[column] in (None, "") and duplicate[column] not in (None, ""):
            changes[column] = duplicate[column]
    if "email" in changes:
        changes["email_status"] = duplicate["email_status"]  # the address's known deliverability comes with it
    if all(survivor[c] in (None, "") for c in _ADDRESS.values()):
        changes.update({c: duplicate[c] for c in _ADDRESS.values() if duplicate[c] not in (None, "")})
    if duplicate["first_contact_at"] is not None and (
        survivor["first_contact_at"] is None or duplicate["first_contact_at"] < survivor["first_contact_at"]
    ):  # the earlier first contact is the true one, with its channel
        changes["first_contact_at"] = duplicate["first_contact_at"]
        changes["first_contact_channel"] = duplicate["first_contact_channel"]
    attributes = {**duplicate["attributes"], **survivor["attributes"]}
    if attributes != survivor["attributes"]:
        changes["attributes"] = attributes
    tags = list(dict.fromkeys([*survivor["tags"], *duplicate["tags"]]))
    if tags != list(survivor["tags"]):
        changes["tags"] = tags
    latest = [t for t in (survivor["last_activity_at"], duplicate["last_activity_at"]) if t is not None]
    if latest and max(latest) != survivor["last_activity_at"]:
        changes["last_activity_at"] = max(latest)
    return changes


def _wire(row: Row) -> dict[str, Any]:
    out = {name: row[column] for name, column in _FILLED.items()}
    out.update({name: row[column] for name, column in _ADDRESS.items()})
    out.update({f"attributes.{k}": v for k, v in (row["attributes"] or {}).items()})
    out["tags"] = list(row["tags"] or []) or None
    out["first_contact_at"] = row["first_contact_at"]
    out["first_contact_channel"] = row["first_contact_channel"]
    out["email_status"] = row["email_status"]
    return out


# What the duplicate was known by, kept on the survivor's history (old value; new value null): the duplicate's
# row is gone, and an erasure of the person must still find what names that record elsewhere (a refused import
# cell, another contact's history: services/gdpr.py reads `merged_contact.*` as the person's former identity).
_IDENTITY_FIELDS = ("email", "phone", "external_id", "first_name", "last_name")


def _merged_identity(duplicate: Row) -> list[history.Change]:
    return [(f"merged_contact.{name}", duplicate[name], None) for name in _IDENTITY_FIELDS
            if duplicate[name] is not None]


def _wire_changes(before: Row, after: Row) -> Sequence[history.Change]:
    """History changes between two versions of the survivor, as wire fields (`address.city`, `tags`, ...)."""
    old, new = _wire(before), _wire(after)
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
