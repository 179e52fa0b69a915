"""A contact's timeline: orders, carts, events, consent events, list changes and field changes, newest first.

One UNION ALL over the six sources, keyset-paginated on (at, kind, ref): each page is one query.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import String, cast, func, literal, select, tuple_, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidInput
from app.models import Cart, ConsentEvent, ContactHistory, Event, ListMembership, Order
from app.services import contacts as contacts_service
from app.services.pagination import Cursor, CursorCodec

__all__ = ["page"]

_SORT = "timeline"


def _entries() -> Any:
    orders = Order.__table__  # type: ignore[attr-defined]
    carts = Cart.__table__  # type: ignore[attr-defined]
    events = Event.__table__  # type: ignore[attr-defined]
    consents = ConsentEvent.__table__  # type: ignore[attr-defined]
    members = ListMembership.__table__  # type: ignore[attr-defined]
    changes = ContactHistory.__table__  # type: ignore[attr-defined]

    def entry(kind: str, table: Any, at: Any, ref: Any, data: Any) -> Any:
        return select(table.c.contact_id.label("contact_id"), literal(kind).label("kind"), at.label("at"),
                      cast(ref, String).label("ref"), data.label("data"))

    return union_all(
        entry("order", orders, orders.c.placed_at, orders.c.id, func.jsonb_build_object(
            "external_id", orders.c.external_id, "status", orders.c.status,
            "total_amount", cast(orders.c.total_amount, String), "currency", orders.c.currency)),
        # A cart shows once, at its opening, with its current status (and when it was closed).
        entry("cart", carts, carts.c.opened_at, carts.c.id, func.jsonb_build_object(
            "external_id", carts.c.external_id, "status", carts.c.status,
            "total_amount", cast(carts.c.total_amount, String), "currency", carts.c.currency,
            "closed_at", carts.c.closed_at, "order_external_id", carts.c.order_external_id)),
        entry("event", events, events.c.occurred_at, events.c.id, func.jsonb_build_object(
            "type", events.c.type, "properties", events.c.properties)),
        entry("consent", consents, consents.c.occurred_at, consents.c.id, func.jsonb_build_object(
            "purpose", consents.c.purpose, "action", consents.c.action, "source", consents.c.source)),
        entry("list_subscribed", members, members.c.subscribed_at, members.c.list_id, func.jsonb_build_object(
            "list_id", members.c.list_id, "source", members.c.source)).where(members.c.subscribed_at.is_not(None)),
        entry("list_unsubscribed", members, members.c.unsubscribed_at, members.c.list_id, func.jsonb_build_object(
            "list_id", members.c.list_id)).where(members.c.unsubscribed_at.is_not(None)),
        entry("change", changes, changes.c.at, changes.c.id, func.jsonb_build_object(
            "field", changes.c.field, "old_value", changes.c.old_value, "new_value", changes.c.new_value,
            "subject", changes.c.subject, "via", changes.c.via)),
    ).subquery("timeline")


async def page(
    session: AsyncSession, contact_id: uuid.UUID, *, limit: int, cursor: str | None, codec: CursorCodec
) -> tuple[list[dict[str, Any]], str | None]:
    await contacts_service.get(session, contact_id)
    timeline = _entries()
    query = select(timeline.c.kind, timeline.c.at, timeline.c.ref, timeline.c.data).where(
        timeline.c.contact_id == contact_id)
    if cursor:
        after = codec.decode(cursor, sort=_SORT)
        kind, _, ref = after.id.partition(":")
        try:
            at = datetime.fromisoformat(str(after.value))
        except ValueError:
            raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from None
        bound = literal(at, type_=timeline.c.at.type)
        # `at <= bound` alone is what PostgreSQL pushes into each branch: the event partitions after it are pruned.
        query = query.where(timeline.c.at <= bound, tuple_(timeline.c.at, timeline.c.kind, timeline.c.ref) < tuple_(
            bound, literal(kind), literal(ref)))
    query = query.order_by(timeline.c.at.desc(), timeline.c.kind.desc(), timeline.c.ref.desc()).limit(limit + 1)
    rows = [dict(r) for r in (await session.execute(query)).mappings()]
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], codec.encode(Cursor(_SORT, last["at"].isoformat(), f"{last['kind']}:{last['ref']}"))
