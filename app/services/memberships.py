"""Membership rows: status changes, reads and pages. The rules deciding them live in lists and consents.

Every status change also writes an outbox message, so emailing tools learn it with the change itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidInput, NotFound
from app.models import ListMembership
from app.services import outbox
from app.services.pagination import Cursor, CursorCodec

__all__ = ["MembershipNotFound", "confirm", "get", "keep_pending_proof", "page", "put", "unsubscribe"]

PENDING, SUBSCRIBED, UNSUBSCRIBED = "pending", "subscribed", "unsubscribed"

_t = ListMembership.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


class MembershipNotFound(NotFound):
    slug, title = "membership-not-found", "This contact is not a member of this list"


async def get(session: AsyncSession, list_id: uuid.UUID, contact_id: uuid.UUID, *, lock: bool = False) -> Row | None:
    query = select(_t).where(_t.c.list_id == list_id, _t.c.contact_id == contact_id)
    if lock:
        query = query.with_for_update()
    return (await session.execute(query)).mappings().first()


async def put(
    session: AsyncSession, list_id: uuid.UUID, contact_id: uuid.UUID, *, status: str, source: str | None,
    at: datetime, pending_proof: Mapping[str, Any] | None = None,
) -> Row:
    """Set a membership to `pending` or `subscribed` (created if needed); the timestamps describe the new state.

    `pending_proof`: a public signup's proof, kept until the person confirms (consents.grant_from_signup).
    A pending request is not a decision: an earlier `unsubscribed_at` stays until the person confirms, so that
    the rule "a grant dated after the unsubscribe" still holds for it (lists._check_consent) — else anyone typing
    the address in the public form would erase that the person left the list."""
    values = {
        "status": status,
        "subscribed_at": at if status == SUBSCRIBED else None,
        "pending_since": at if status == PENDING else None,
        "pending_proof": dict(pending_proof) if status == PENDING and pending_proof else None,
        "unsubscribed_at": None,
        "updated_at": at,
    }
    kept = {"unsubscribed_at": _t.c.unsubscribed_at} if status == PENDING else {}
    statement = (
        insert(_t)
        .values(list_id=list_id, contact_id=contact_id, source=source, **values)
        .on_conflict_do_update(index_elements=[_t.c.list_id, _t.c.contact_id],
                               set_={**values, **kept, "source": source})
        .returning(*_t.c)
    )
    row = (await session.execute(statement)).mappings().one()
    if status == SUBSCRIBED:
        await outbox.add(session, "membership.subscribed", contact_id=contact_id,
                         payload={"list_id": str(list_id), "contact_id": str(contact_id)})
    return row


async def keep_pending_proof(
    session: AsyncSession, list_id: uuid.UUID, contact_id: uuid.UUID, proof: Mapping[str, Any]
) -> None:
    """A pending membership asked for again: the newest request's proof is the one a confirmation will record."""
    await session.execute(update(_t).where(_t.c.list_id == list_id, _t.c.contact_id == contact_id,
                                           _t.c.status == PENDING).values(pending_proof=dict(proof)))


async def confirm(session: AsyncSession, list_id: uuid.UUID, contact_id: uuid.UUID, *, at: datetime) -> Row:
    """pending → subscribed, keeping the source the subscription came with."""
    row = (
        await session.execute(
            update(_t)
            .where(_t.c.list_id == list_id, _t.c.contact_id == contact_id)
            .values(status=SUBSCRIBED, subscribed_at=at, unsubscribed_at=None, pending_since=None, pending_proof=None,
                    updated_at=at)
            .returning(*_t.c)
        )
    ).mappings().one()
    await outbox.add(session, "membership.subscribed", contact_id=contact_id,
                     payload={"list_id": str(list_id), "contact_id": str(contact_id)})
    return row


async def unsubscribe(
    session: AsyncSession, contact_id: uuid.UUID, *, list_id: uuid.UUID | None, at: datetime, reason: str
) -> list[Row]:
    """Unsubscribe from one list, or from every list when list_id is None; rows already unsubscribed stay as they are.

    Returns the rows that changed.
    """
    statement = (
        update(_t)
        .where(_t.c.contact_id == contact_id, _t.c.status != UNSUBSCRIBED)
        .values(status=UNSUBSCRIBED, unsubscribed_at=at, pending_since=None, pending_proof=None, updated_at=at)
        .returning(*_t.c)
    )
    if list_id is not None:
        statement = statement.where(_t.c.list_id == list_id)
    changed = list((await session.execute(statement)).mappings())
    await outbox.add_many(
        session, "membership.unsubscribed",
        [(r["contact_id"], {"list_id": str(r["list_id"]), "contact_id": str(r["contact_id"]), "reason": reason})
         for r in changed],
    )
    return changed


async def page(
    session: AsyncSession, list_id: uuid.UUID, *, status: str | None, limit: int, cursor: str | None,
    codec: CursorCodec,
) -> tuple[list[Row], str | None]:
    """Members in contact_id order (keyset: stable under concurrent inserts)."""
    sort = f"members:{list_id}:{status or '*'}"  # a cursor only continues the listing it came from
    query = select(_t).where(_t.c.list_id == list_id)
    if status is not None:
        query = query.where(_t.c.status == status)
    if cursor:
        query = query.where(_t.c.contact_id > _uuid(codec.decode(cursor, sort=sort).id))
    rows = list((await session.execute(query.order_by(_t.c.contact_id).limit(limit + 1))).mappings())
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], codec.encode(Cursor(sort, None, str(rows[limit - 1]["contact_id"])))


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from None
