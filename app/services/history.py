"""Field-level history of contacts: who changed what, when, and through what."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidInput
from app.models import ContactHistory
from app.models.base import utc_now
from app.security import Principal

__all__ = ["CREATED", "Change", "id_cursor", "jsonable", "page", "record"]

# The field of a contact's creation entry: one entry, whatever the fields set (their values are the contact's own,
# until a later entry records one as its old value). An import's names its file and row, the API's the fields set.
CREATED = "created"
Change = tuple[str, Any, Any]  # (field, old, new), field as on the wire: "email", "address.city", "attributes.size"
_table = ContactHistory.__table__  # type: ignore[attr-defined]
_BIGINT_MAX = 2**63 - 1


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    return value


async def record(
    session: AsyncSession, contact_id: uuid.UUID, changes: Sequence[Change], *, actor: Principal, via: str
) -> None:
    """Append one row per changed field, in one statement."""
    if not changes:
        return
    at = utc_now()
    await session.execute(
        insert(_table),
        [
            {"contact_id": contact_id, "field": field, "old_value": jsonable(old), "new_value": jsonable(new),
             "subject": actor.subject, "via": via, "at": at}
            for field, old, new in changes
        ],
    )


async def page(
    session: AsyncSession, contact_id: uuid.UUID, *, limit: int, before_id: int | None
) -> list[dict[str, Any]]:
    """Newest first; `before_id` continues after the last row of the previous page."""
    query = select(_table).where(_table.c.contact_id == contact_id)
    if before_id is not None:
        query = query.where(_table.c.id < before_id)
    rows = await session.execute(query.order_by(_table.c.id.desc()).limit(limit + 1))
    return [dict(r) for r in rows.mappings()]


def id_cursor(cursor: str | None) -> int | None:
    """A cursor that is a row id (history, events), or a 422 naming `cursor` when no bigint id can be it."""
    if not cursor:
        return None
    try:
        value = int(cursor)
    except ValueError:
        value = -1
    if not 0 <= value <= _BIGINT_MAX:
        raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor")
    return value
