"""Carts: what a contact left in the shop's basket, open until an order converts it or the shop abandons it."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy import update as update_statement
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, InvalidInput, NotFound
from app.models import Cart, Contact
from app.models.base import utc_now
from app.schemas.orders import CartPut, CartStatus
from app.security import Principal, Scope
from app.services import outbox
from app.services.orders import check_version, order_version, resolve_contact, same_values

__all__ = ["CART_CHANGED", "CartClosed", "CartNotFound", "cart_version", "convert", "get_cart", "upsert_cart"]

_carts = Cart.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]
CART_CHANGED = "commerce.cart_changed"   # outbox topic: the vendors that push carts read the cart's state


class CartNotFound(NotFound):
    slug, title = "cart-not-found", "No such cart"


class CartClosed(Conflict):
    slug, title = "cart-closed", "The cart was converted by an order"


async def upsert_cart(
    session: AsyncSession, external_id: str, payload: CartPut, *, actor: Principal,
    expected_version: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """Create or replace the cart; a replay changes nothing. A converted cart is closed: only a replay of it passes.

    With `expected_version` (If-Match), PreconditionFailed unless the cart exists at that version.
    """
    previous = await session.scalar(select(_carts.c.contact_id).where(_carts.c.external_id == external_id))
    contact_id = await resolve_contact(session, payload.contact, actor=actor, via="checkout", along=previous)
    current = (await session.execute(
        select(_carts).where(_carts.c.external_id == external_id).with_for_update()
    )).mappings().first()
    check_version(current, expected_version, what="cart", actor=actor)
    status = payload.status.value
    values: dict[str, Any] = {
        "contact_id": contact_id, "status": status, "currency": payload.currency,
        "total_amount": payload.total_amount if payload.total_amount is not None else payload.lines_total(),
        "items": [item.model_dump(mode="json") for item in payload.items], "checkout_url": payload.checkout_url,
        "opened_at": payload.opened_at,
    }
    now = utc_now()
    if current is not None and current["status"] == "converted":
        if not same_values(current, values):
            # the order that converted it is orders:read's to know (docs/security.md, class 11)
            by = (f"the order that converted it is {current['order_external_id'] or 'unknown'}; "
                  if actor.reads(Scope.ORDERS_READ) else "")
            raise CartClosed(f"a converted cart is closed: {by}start a new cart")
        return dict(current), False
    closed = status != "open"
    if payload.closed_at is not None:
        values["closed_at"] = payload.closed_at
    elif not closed:
        values["closed_at"] = None
    elif current is None or current["status"] != status:
        values["closed_at"] = now   # closed now, as far as Carnet knows
    if current is None:
        row = (await session.execute(
            insert(_carts).values(id=uuid.uuid4(), external_id=external_id, created_at=now, updated_at=now,
                                  **{"closed_at": None, **values})
            .on_conflict_do_nothing().returning(*_carts.c)
        )).mappings().first()
        if row is None:  # created concurrently: replace it like any existing cart
            return await upsert_cart(session, external_id, payload, actor=actor, expected_version=expected_version)
        await _changed(session, row)
        return dict(row), True
    if same_values(current, values):
        return dict(current), False
    row = (await session.execute(
        update_statement(_carts).where(_carts.c.id == current["id"]).values(**values, updated_at=now)
        .returning(*_carts.c)
    )).mappings().one()
    await _changed(session, row)
    return dict(row), False


async def convert(session: AsyncSession, cart_external_id: str, *, order_external_id: str,
                  contact_id: uuid.UUID) -> None:
    """An order named this cart: it is converted (closed). A cart Carnet never heard of is left alone (the shop may
    not send carts); one of another contact is refused, as the order would then close someone else's cart."""
    cart = (await session.execute(
        select(_carts).where(_carts.c.external_id == cart_external_id).with_for_update()
    )).mappings().first()
    if cart is None or (cart["status"] == "converted" and cart["order_external_id"] == order_external_id):
        return
    if cart["contact_id"] != contact_id:
        raise InvalidInput.one("cart_external_id", "this cart belongs to another contact", "cart_of_another_contact")
    if cart["status"] == "converted":
        raise InvalidInput.one("cart_external_id", "this cart was converted by another order", "cart_closed")
    now = utc_now()
    row = (await session.execute(
        update_statement(_carts).where(_carts.c.id == cart["id"])
        .values(status=CartStatus.CONVERTED.value, order_external_id=order_external_id, closed_at=now, updated_at=now)
        .returning(*_carts.c)
    )).mappings().one()
    await _changed(session, row)


async def get_cart(session: AsyncSession, external_id: str) -> dict[str, Any]:
    row = (await session.execute(select(_carts).where(_carts.c.external_id == external_id))).mappings().first()
    if row is None:
        raise CartNotFound(f"no cart with external_id {external_id!r}")
    return dict(row)


cart_version = order_version  # the same rule: updated_at in microseconds


async def _changed(session: AsyncSession, row: Any) -> None:
    """The contact was active, and the destinations that push carts learn of it (ids only, in this transaction)."""
    await session.execute(update_statement(_contacts).where(_contacts.c.id == row["contact_id"]).values(
        last_activity_at=func.greatest(_contacts.c.last_activity_at, row["opened_at"])))
    await outbox.add(session, CART_CHANGED, contact_id=row["contact_id"],
                     payload={"cart_id": str(row["id"]), "external_id": row["external_id"]})

