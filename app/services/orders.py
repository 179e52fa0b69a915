"""Orders, the contact an order or event is for, and the contact stats and lifecycle stage that follow from them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy import update as update_statement
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidInput, NotFound, PreconditionFailed
from app.models import Contact, Order
from app.models.base import utc_now
from app.schemas.contacts import ContactUpsert
from app.schemas.orders import MAX_MONEY, ContactRef, OrderPut
from app.security import Principal, Scope
from app.services import contacts as contacts_service
from app.services import history, locks, outbox

__all__ = [
    "EVENT_RECORDED",
    "ORDER_CHANGED",
    "LifecyclePolicy",
    "OrderNotFound",
    "check_version",
    "contact_orders",
    "get_order",
    "order_version",
    "refresh_aged_stages",
    "refresh_stats",
    "resolve_contact",
    "same_values",
    "upsert_order",
]

_orders = Order.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]
NOT_COUNTED = ("cancelled", "refunded")
# Outbox topics for the vendors that push commerce data (app/sync/commerce.py); webhooks get them only when named.
ORDER_CHANGED = "commerce.order_changed"
EVENT_RECORDED = "commerce.event_recorded"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OrderNotFound(NotFound):
    slug, title = "order-not-found", "No such order"


@dataclass(frozen=True, slots=True)
class LifecyclePolicy:
    """Thresholds from the settings (API.md names them)."""

    loyal_min_orders: int = 3
    loyal_window_days: int = 365
    lapsed_after_days: int = 365

    def stage(self, *, orders: int, recent: int, last_order_at: datetime | None, now: datetime) -> str:
        if orders == 0 or last_order_at is None:
            return "prospect"
        if last_order_at < now - timedelta(days=self.lapsed_after_days):
            return "lapsed_customer"
        if recent >= self.loyal_min_orders:
            return "loyal_customer"
        return "new_customer"


async def resolve_contact(
    session: AsyncSession, ref: ContactRef, *, actor: Principal, via: str, along: uuid.UUID | None = None
) -> uuid.UUID:
    """Who an order or event is for, locked for this transaction together with `along` (an order's previous
    contact), in id order, before anything referencing it is written (services/locks.py).

    By id: that contact, or the survivor it was merged into (the merge moved the person's orders and events
    there). By external_id alone: the contact holding it. Unknown or erased: 422 on `contact.*`. Else by email,
    through an upsert (an unknown email creates the contact).
    """
    if ref.id is None and ref.email is not None:
        # The upsert may change keys (FOR UPDATE): the contacts it can match are locked with `along` first.
        keyed = [_contacts.c.email == ref.email]
        if ref.external_id is not None:
            keyed.append(_contacts.c.external_id == ref.external_id)
        holders = select(_contacts.c.id).where(or_(*keyed))
        await locks.lock_contacts(session, [*(await session.scalars(holders)), along], key_change=True)
        # Only the keys the reference names: an absent external_id must not read as "clear it" (merge semantics).
        keys = ContactUpsert(**ref.model_dump(include={"email", "external_id"}, exclude_none=True))
        result = await contacts_service.upsert(session, keys, actor=actor, via=via)
        contact_id: uuid.UUID = result.row["id"]
        return contact_id
    if ref.id is not None:
        field, found = "contact.id", ref.id
    else:
        field = "contact.external_id"
        found = await session.scalar(select(_contacts.c.id).where(_contacts.c.external_id == ref.external_id))
    locked = None if found is None else await locks.lock_following_merges(session, found, along=along)
    if locked is None:
        message = ("no contact with this id" if ref.id is not None
                   else "no contact with this external_id; add an email to create one")
        raise InvalidInput.one(field, message, "unknown_contact")
    return locked


def order_version(row: Mapping[str, Any]) -> int:
    """An order's version for ETag/If-Match: its updated_at in microseconds (a change moves it, a replay does not)."""
    return (row["updated_at"] - _EPOCH) // timedelta(microseconds=1)  # type: ignore[no-any-return]


async def upsert_order(
    session: AsyncSession, external_id: str, payload: OrderPut, *, actor: Principal, policy: LifecyclePolicy,
    expected_version: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """Create or replace the order; the contact's stats follow in the same transaction. Replays change nothing.

    With `expected_version` (If-Match), PreconditionFailed unless the order exists at that version.
    """
    previous = await session.scalar(select(_orders.c.contact_id).where(_orders.c.external_id == external_id))
    contact_id = await resolve_contact(session, payload.contact, actor=actor, via="checkout", along=previous)
    values = {
        "contact_id": contact_id, "placed_at": payload.placed_at, "status": payload.status.value,
        "currency": payload.currency, "total_amount": payload.total_amount, "channel": payload.channel,
        "items": [item.model_dump(mode="json") for item in payload.items],
        "cart_external_id": payload.cart_external_id,
    }
    current = (await session.execute(
        select(_orders).where(_orders.c.external_id == external_id).with_for_update()
    )).mappings().first()
    if current is not None and current["contact_id"] not in (contact_id, previous):
        await locks.lock_contacts(session, [current["contact_id"]])  # moved meanwhile: its stats follow too
    check_version(current, expected_version, what="order", actor=actor)
    now = utc_now()
    if current is None:
        statement = (insert(_orders).values(id=uuid.uuid4(), external_id=external_id, created_at=now, updated_at=now,
                                            **values)
                     .on_conflict_do_nothing().returning(*_orders.c))
        row = (await session.execute(statement)).mappings().first()
        if row is None:  # created concurrently: replace it like any existing order
            return await upsert_order(session, external_id, payload, actor=actor, policy=policy,
                                      expected_version=expected_version)
        await refresh_stats(session, contact_id, actor=actor, policy=policy)
        await _order_changed(session, row)
        return dict(row), True
    if same_values(current, values):
        return dict(current), False
    row = (await session.execute(
        update_statement(_orders).where(_orders.c.id == current["id"]).values(**values, updated_at=now)
        .returning(*_orders.c)
    )).mappings().one()
    for affected in {current["contact_id"], contact_id}:
        await refresh_stats(session, affected, actor=actor, policy=policy)
    await _order_changed(session, row)
    return dict(row), False


async def _order_changed(session: AsyncSession, row: Mapping[str, Any]) -> None:
    """The cart it names is converted, and the destinations that push orders learn of it (ids only)."""
    from app.services import carts  # carts builds on this module (resolve_contact)

    await outbox.add(session, ORDER_CHANGED, contact_id=row["contact_id"],
                     payload={"order_id": str(row["id"]), "external_id": row["external_id"]})
    if row["cart_external_id"] is not None:
        await carts.convert(session, row["cart_external_id"], order_external_id=row["external_id"],
                            contact_id=row["contact_id"])


def check_version(current: Mapping[str, Any] | None, expected_version: int | None, *, what: str,
                  actor: Principal) -> None:
    """If-Match: PreconditionFailed unless the row exists at that version (None: no condition).

    The current version is the row's updated_at: it is named only to a reader of orders (docs/security.md, 11)."""
    if expected_version is None:
        return
    if current is None:
        raise PreconditionFailed(f"the {what} does not exist yet: send no If-Match to create it")
    if order_version(current) != expected_version:
        if not actor.reads(Scope.ORDERS_READ):
            raise PreconditionFailed(f"the {what} changed since that version")
        raise PreconditionFailed(f"the {what} is at version {order_version(current)}",
                                 current_version=order_version(current))


def same_values(current: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """A replay: every value given equals the stored one (decimals by value)."""
    return all(_same(current[k], v) for k, v in values.items())


async def get_order(session: AsyncSession, external_id: str) -> dict[str, Any]:
    row = (await session.execute(select(_orders).where(_orders.c.external_id == external_id))).mappings().first()
    if row is None:
        raise OrderNotFound(f"no order with external_id {external_id!r}")
    return dict(row)


async def contact_orders(session: AsyncSession, contact_id: uuid.UUID, *, limit: int,
                         before: tuple[datetime, uuid.UUID] | None) -> list[dict[str, Any]]:
    """Newest first, keyset on (placed_at, id)."""
    await contacts_service.get(session, contact_id)
    query = select(_orders).where(_orders.c.contact_id == contact_id)
    if before is not None:
        query = query.where(func.row(_orders.c.placed_at, _orders.c.id) < func.row(*before))
    rows = await session.execute(query.order_by(_orders.c.placed_at.desc(), _orders.c.id.desc()).limit(limit + 1))
    return [dict(r) for r in rows.mappings()]


async def refresh_stats(session: AsyncSession, contact_id: uuid.UUID, *, actor: Principal,
                        policy: LifecyclePolicy, field: str = "total_amount") -> None:
    """Recompute a contact's stats from its counted orders. The count, the first and last order dates and the
    lifecycle stage take every counted order; the money (total_spent, average_basket, last_order_amount) only the
    orders in `currency`, that of the latest one: amounts in two currencies are never added (docs/decisions.md).

    The contact is locked first (FOR NO KEY UPDATE: rows referencing it may still be inserted), so what is read
    next includes every order change committed before ours: stats never point at an order cancelled meanwhile.
    A total_spent past its column (numeric(14, 2)) is a 422 on `field`, the input that would take it there.
    """
    now = utc_now()
    current = (await session.execute(
        select(_contacts.c.lifecycle_stage).where(_contacts.c.id == contact_id).with_for_update(key_share=True)
    )).scalar_one()
    counted = and_(_orders.c.contact_id == contact_id, _orders.c.status.not_in(NOT_COUNTED))
    latest = (await session.execute(
        select(_orders.c.currency, _orders.c.total_amount, _orders.c.placed_at).where(counted)
        .order_by(_orders.c.placed_at.desc(), _orders.c.id.desc()).limit(1)
    )).first()
    if latest is None:
        stats: dict[str, Any] = {"orders_count": 0, "total_spent": Decimal(0), "average_basket": None,
                                 "first_order_at": None, "last_order_at": None, "last_order_amount": None,
                                 "currency": None}
        recent = 0
    else:
        in_currency = _orders.c.currency == latest.currency
        count, first, recent, paid, total = (await session.execute(select(
            func.count(), func.min(_orders.c.placed_at),
            func.count().filter(_orders.c.placed_at >= now - timedelta(days=policy.loyal_window_days)),
            func.count().filter(in_currency), func.sum(_orders.c.total_amount).filter(in_currency),
        ).where(counted))).one()
        if total > MAX_MONEY:  # the caller's transaction rolls back: nothing of the write stays
            raise InvalidInput.one(field, f"the contact's total_spent in {latest.currency} would pass "
                                   f"{MAX_MONEY:,}, the most it holds", "total_spent_out_of_range")
        stats = {"orders_count": count, "total_spent": total, "average_basket": _cents(total / paid),
                 "first_order_at": first, "last_order_at": latest.placed_at,
                 "last_order_amount": latest.total_amount, "currency": latest.currency}
    stage = policy.stage(orders=stats["orders_count"], recent=recent, last_order_at=stats["last_order_at"], now=now)
    await session.execute(update_statement(_contacts).where(_contacts.c.id == contact_id).values(
        **stats, lifecycle_stage=stage, version=_contacts.c.version + 1, updated_at=now,
        last_activity_at=func.greatest(_contacts.c.last_activity_at, stats["last_order_at"])))
    if stage != current:
        await history.record(session, contact_id, [("lifecycle_stage", current, stage)], actor=actor, via="orders")


async def refresh_aged_stages(session: AsyncSession, *, policy: LifecyclePolicy, actor: Principal) -> int:
    """Customers whose last order aged past the lapse threshold become lapsed (idempotent, set-based)."""
    cutoff = utc_now() - timedelta(days=policy.lapsed_after_days)
    aged = (
        select(_contacts.c.id, _contacts.c.lifecycle_stage.label("old_stage"))
        .where(and_(_contacts.c.last_order_at < cutoff,
                    _contacts.c.lifecycle_stage.in_(("new_customer", "loyal_customer"))))
        .order_by(_contacts.c.id).with_for_update(key_share=True)  # many contacts: in id order (services/locks.py)
        .subquery()
    )
    rows = (await session.execute(
        update_statement(_contacts).where(_contacts.c.id == aged.c.id)
        .values(lifecycle_stage="lapsed_customer", version=_contacts.c.version + 1, updated_at=utc_now())
        .returning(_contacts.c.id, aged.c.old_stage)
    )).all()
    for contact_id, old_stage in rows:
        await history.record(session, contact_id, [("lifecycle_stage", old_stage, "lapsed_customer")],
                             actor=actor, via="lifecycle")
    return len(rows)


def _cents(amount: Decimal) -> Decimal:
    """To the cent, a half cent away from zero: as round(numeric) in SQL and shops round (round() goes to even)."""
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _same(stored: Any, given: Any) -> bool:
    if isinstance(stored, Decimal) and isinstance(given, Decimal):
        return stored == given
    return bool(stored == given)

