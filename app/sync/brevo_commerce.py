"""Brevo's e-commerce side (docs/sync.md, "Commerce"), after the contacts of a push are written.

1. `POST /ecommerce/activate` once per API key and process (the e-commerce app must be on before products).
2. categories then products named by the push's lines: `POST /categories/batch` and `POST /products/batch`
   (`updateEnabled: true`, at most `BATCH` each), before any order.
3. orders: `POST /orders/status/batch`, the person identified by `email_id`; a person without a current
   email_marketing grant has theirs sent `historical: true` (kept for reporting, no automation runs on it).
   The batches of a push go side by side, a contact's orders in one call (or, beyond `BATCH`, in calls one
   after the other), so its statuses reach Brevo in Carnet's order.
4. carts: Brevo has no cart API: a cart is the custom event `cart_updated` (`POST /events`, its lines, total and
   `checkout_url` in `event_properties`), one that closed or lost its grant `cart_deleted`.
5. events of `push_events`: `POST /events`, `event_name` the type (`.` read as `_`: Brevo takes letters, digits,
   `-` and `_`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from app.sync import net
from app.sync.base import ContactState
from app.sync.commerce import CartPush, EventPush, Line, OrderPush, Product, amount, products_of

__all__ = ["BATCH", "push_commerce"]

BATCH = 100                 # products, categories and orders per batch call (Brevo documents no cap: ours)
Request = Callable[..., Awaitable[httpx.Response]]
Reason = Callable[[str, httpx.Response], str]
OrderBatch = tuple[list[ContactState], list[dict[str, Any]]]     # the contacts of one call, and their orders
_activated: set[str] = set()        # API address|account whose e-commerce app this process switched on


async def push_commerce(request: Request, reason: Reason, account: str, states: Sequence[ContactState],
                        errors: dict[uuid.UUID, str]) -> None:
    """Send the commerce part of these (already written) contacts; a contact whose part failed gets its error."""
    owing = [s for s in states if s.commerce is not None and s.contact_id not in errors]
    if not any(s.commerce.products or s.commerce.orders or s.commerce.carts or s.commerce.events  # type: ignore[union-attr]
               for s in owing):
        return

    def fail(group: Sequence[ContactState], error: str | None) -> None:
        for state in group if error else ():
            errors.setdefault(state.contact_id, error or "")

    products = products_of(owing)
    if products:
        fail(owing, await _activate(request, reason, account) or await _catalogue(request, reason, products))
        owing = [s for s in owing if s.contact_id not in errors]

    async def send_orders(chain: list[OrderBatch], historical: bool) -> None:
        for part, orders in chain:
            if any(s.contact_id in errors for s in part):
                return  # a contact's later statuses never overtake its failed earlier ones
            response = await request("POST", "/orders/status/batch", json={"orders": orders, "historical": historical})
            fail(part, None if response.status_code in (200, 201, 202) else reason("orders", response))

    # The calls of a push go at once (the limiter sets the pace): one after the other they used half the rate.
    await net.run_all(
        send_orders(chain, historical) for historical in (False, True)
        for chain in _order_chains([s for s in owing if s.commerce.orders  # type: ignore[union-attr]
                                    and s.commerce.may_market is not historical])  # type: ignore[union-attr]
    )

    async def events_of(state: ContactState) -> None:
        commerce = state.commerce
        assert commerce is not None
        for body in [*(_cart_event(state.email, c) for c in commerce.carts),
                     *(_event(state.email, e) for e in commerce.events)]:
            if state.contact_id in errors:
                return
            response = await request("POST", "/events", json=body)
            fail([state], None if response.status_code in (200, 201, 204) else reason("event", response))

    await net.run_all(events_of(s) for s in owing if s.contact_id not in errors
                      and (s.commerce.carts or s.commerce.events))  # type: ignore[union-attr]


async def _activate(request: Request, reason: Reason, account: str) -> str | None:
    if account in _activated:
        return None
    response = await request("POST", "/ecommerce/activate")
    if response.status_code != 200:
        return reason("e-commerce activation", response)
    _activated.add(account)
    return None


async def _catalogue(request: Request, reason: Reason, products: Sequence[Product]) -> str | None:
    """Categories, then the products that name them; the batches of each step at once."""
    categories = sorted({p.category for p in products if p.category})
    problems: list[str] = []

    async def batch(path: str, step: str, body: dict[str, Any]) -> None:
        response = await request("POST", path, json={"updateEnabled": True, **body})
        if response.status_code not in (200, 201, 204):
            problems.append(reason(step, response))

    await net.run_all(batch("/categories/batch", "categories", {"categories": [
        {"id": c, "name": c} for c in categories[start:start + BATCH]]}) for start in range(0, len(categories), BATCH))
    if not problems:
        await net.run_all(batch("/products/batch", "products", {"products": [
            _product(p) for p in products[start:start + BATCH]]}) for start in range(0, len(products), BATCH))
    return problems[0] if problems else None


def _order_chains(states: Sequence[ContactState]) -> list[list[OrderBatch]]:
    """Orders packed `BATCH` to a call, a contact's orders (oldest first) never split across calls that go at once:
    each chain is sent in order, the chains side by side. A contact with more than `BATCH` orders has a chain of
    its own."""
    chains: list[list[OrderBatch]] = []
    part: list[ContactState] = []
    orders: list[dict[str, Any]] = []
    for state in states:
        mine = [_order(state.email, o) for o in state.commerce.orders]  # type: ignore[union-attr]
        if len(mine) > BATCH:
            chains.append([([state], mine[i:i + BATCH]) for i in range(0, len(mine), BATCH)])
            continue
        if len(orders) + len(mine) > BATCH:
            chains.append([(part, orders)])
            part, orders = [], []
        part.append(state)
        orders += mine
    if orders:
        chains.append([(part, orders)])
    return chains


def _product(product: Product) -> dict[str, Any]:
    body: dict[str, Any] = {"id": product.sku, "name": product.name or product.sku, "sku": product.sku,
                            "price": amount(product.price)}
    if product.category:
        body["categories"] = [product.category]
    return body


def _order(email: str, order: OrderPush) -> dict[str, Any]:
    return {
        "id": order.external_id, "status": order.status, "amount": amount(order.total),
        "createdAt": _instant(order.placed_at), "updatedAt": _instant(order.updated_at),
        "identifiers": {"email_id": email}, "products": _lines(order.lines),
    }


def _lines(lines: Sequence[Line]) -> list[dict[str, Any]]:
    return [{"productId": line.sku, "quantity": line.quantity, "price": amount(line.unit_price)} for line in lines]


def _cart_event(email: str, cart: CartPush) -> dict[str, Any]:
    properties: dict[str, Any] = {"cart_id": cart.external_id, "currency": cart.currency,
                                  "total": str(cart.total), "status": cart.status, "products": _lines(cart.lines)}
    if cart.checkout_url:
        properties["checkout_url"] = cart.checkout_url
    return {"event_name": "cart_deleted" if cart.status == "removed" else "cart_updated",
            "identifiers": {"email_id": email}, "event_properties": properties}


def _event(email: str, event: EventPush) -> dict[str, Any]:
    return {"event_name": event.type.replace(".", "_"), "event_date": event.occurred_at.isoformat(),
            "identifiers": {"email_id": email}, "event_properties": _properties(event.properties)}


def _properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    """Keys Brevo takes, "top level properties and nested properties" alike (letters, digits, `-`, `_`, at most
    255); other keys are left out, at every depth (one refused key fails the event, and with it the contact's push)."""
    return {k: _nested(v) for k, v in properties.items() if _key(k) and v is not None}


def _key(key: str) -> bool:
    return bool(key) and len(key) <= 255 and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in key)


def _nested(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _nested(v) for k, v in value.items() if _key(k)}
    if isinstance(value, list):
        return [_nested(item) for item in value]
    return value


def _instant(value: datetime) -> str:
    """Brevo's `YYYY-MM-DDTHH:mm:ssZ` (UTC)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
