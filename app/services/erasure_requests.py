"""Erasure requests filed from the preference center (PREFERENCES_ERASURE=request): the admin's queue.

Oldest first, each due one month after it was filed (GDPR art. 12(3)). An admin completes one (the contact is
erased, as by DELETE /v1/contacts/{id}) or refuses it with the reason the law allows (art. 17(3), e.g. invoices
that must be kept); erasing the contact any other way completes its open request too (services/gdpr.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, NotFound
from app.models import Contact, ErasureRequest
from app.models.base import utc_now
from app.security import Principal
from app.services import gdpr, locks
from app.services.locks import lock_following_merges
from app.services.pagination import Cursor, CursorCodec
from app.services.preferences import ANSWER_WITHIN

__all__ = ["ErasureRequestClosed", "ErasureRequestNotFound", "complete", "get", "page", "refuse"]

_t = ErasureRequest.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


class ErasureRequestNotFound(NotFound):
    slug, title = "erasure-request-not-found", "No such erasure request"


class ErasureRequestClosed(Conflict):
    slug, title = "erasure-request-closed", "This erasure request was already answered"


def _query() -> Any:
    return (
        select(*_t.c, (_t.c.requested_at + ANSWER_WITHIN).label("due_by"), _contacts.c.email,
               _contacts.c.first_name, _contacts.c.last_name)
        .select_from(_t.outerjoin(_contacts, _contacts.c.id == _t.c.contact_id))
    )


async def page(
    session: AsyncSession, *, status: str | None, limit: int, cursor: str | None, codec: CursorCodec
) -> tuple[list[Row], str | None]:
    """Oldest request first (the first due), keyset on (requested_at, id)."""
    sort = f"erasure-requests:{status or '*'}"
    query = _query()
    if status is not None:
        query = query.where(_t.c.status == status)
    if cursor:
        after = codec.decode(cursor, sort=sort)
        query = query.where(tuple_(_t.c.requested_at, _t.c.id) > (datetime.fromisoformat(after.value),
                                                                   uuid.UUID(after.id)))
    rows = list((await session.execute(query.order_by(_t.c.requested_at, _t.c.id).limit(limit + 1))).mappings())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], codec.encode(Cursor(sort, last["requested_at"].isoformat(), str(last["id"])))


async def get(session: AsyncSession, request_id: uuid.UUID) -> Row:
    row = (await session.execute(_query().where(_t.c.id == request_id))).mappings().first()
    if row is None:
        raise ErasureRequestNotFound(f"no erasure request with id {request_id}")
    return row


async def complete(session: AsyncSession, request_id: uuid.UUID, *, actor: Principal) -> Row:
    """Erase the person now (one transaction); the request is completed by it, naming the admin.

    The person is locked before the request, the order every erasure takes them in (the contact, then its open
    request: gdpr.erase_many): locking the request first deadlocked with a DELETE of the contact at the same time.
    """
    await locks.exclude_import_batches(session)  # before the person's lock, as every erasure (locks.py)
    # Merged since: the survivor holds the person now. None: erased since (that erasure completed the request).
    person = await lock_following_merges(session, (await get(session, request_id))["contact_id"], key_change=True)
    await _lock_open(session, request_id)
    if person is not None:
        await gdpr.erase(session, person, actor=actor)
    await _close(session, request_id, status="completed", by=actor.subject, note=None)
    return await get(session, request_id)


async def refuse(session: AsyncSession, request_id: uuid.UUID, *, actor: Principal, note: str) -> Row:
    await _lock_open(session, request_id)
    await _close(session, request_id, status="refused", by=actor.subject, note=note)
    return await get(session, request_id)


async def _lock_open(session: AsyncSession, request_id: uuid.UUID) -> Row:
    row = (await session.execute(select(_t).where(_t.c.id == request_id).with_for_update())).mappings().first()
    if row is None:
        raise ErasureRequestNotFound(f"no erasure request with id {request_id}")
    if row["status"] != "open":
        raise ErasureRequestClosed(f"this request is {row['status']}", request_status=row["status"])
    return row


async def _close(session: AsyncSession, request_id: uuid.UUID, *, status: str, by: str, note: str | None) -> None:
    await session.execute(update(_t).where(_t.c.id == request_id)
                          .values(status=status, resolved_at=utc_now(), resolved_by=by, note=note))
