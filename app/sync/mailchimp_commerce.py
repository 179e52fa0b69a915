"""Mailchimp's e-commerce side (docs/sync.md, "Commerce"), after the members of a push are written.

1. the store (`store_id`): `GET /ecommerce/stores/{id}` once per process; missing → `POST /ecommerce/stores` on the
   store's audience, in `store_currency` (else the currency of the first order or cart sent).
2. products named by the push's lines, before any order or cart: new → `POST .../products` (one variant, id = sku);
   known or already there → `PATCH .../products/{sku}` (title) and `PUT .../variants/{sku}` (price).
3. per contact, in order: the customer (`PUT .../customers/{contact id}`, `opt_in_status` = subscribed to the
   store's audience; Mailchimp never lets it change an existing member, so it subscribes no one; inside the
   order when the first order is new: one call instead of two), then orders (`POST`, or `PATCH` when known),
   carts (`POST`/`PATCH`; converted or without a grant: `DELETE`) and events
   (`POST /lists/{list}/members/{hash}/events` on each audience the person is subscribed to).
Erasure (`forget`): `DELETE .../carts/{id}`, `DELETE .../orders/{id}`, then `DELETE .../customers/{id}`, for what
the vendor holds (404: done).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from app.sync import net
from app.sync.base import ContactState, Erasure
from app.sync.commerce import CartPush, EventPush, Line, OrderPush, Product, amount, products_of
from app.sync.ids import subscriber_hash

__all__ = ["MailchimpStore", "forget", "push_commerce", "requests_of"]

Request = Callable[..., Awaitable[httpx.Response]]
Reason = Callable[[str, httpx.Response], str]
_stores: set[tuple[str, str]] = set()     # (API address|account, store id) known to exist, in this process
# Carnet's order status → Mailchimp's financial and fulfillment status.
_FINANCIAL = {"placed": "pending", "paid": "paid", "shipped": "paid", "delivered": "paid", "cancelled": "cancelled",
              "refunded": "refunded"}
_SHIPPED = ("shipped", "delivered")


class MailchimpStore:
    def __init__(self, store_id: str, list_id: str | None, currency: str | None) -> None:
        self.id, self.list_id, self.currency = store_id, list_id, currency

    def path(self, *parts: str) -> str:
        return "/ecommerce/stores/" + "/".join(quote(p, safe="") for p in (self.id, *parts))


async def push_commerce(request: Request, reason: Reason, account: str, store: MailchimpStore | None,
                        states: Sequence[ContactState], errors: dict[uuid.UUID, str]) -> None:
    owing = [s for s in states if s.commerce is not None and s.contact_id not in errors]

    def fail(state: ContactState, error: str | None) -> bool:
        if error:
            errors.setdefault(state.contact_id, error)
        return error is None

    if store is not None and any(s.commerce.customer or s.commerce.orders or s.commerce.carts  # type: ignore[union-attr]
                                 for s in owing):
        error = await _ensure_store(request, reason, account, store, owing)
        products = products_of(owing)
        errors_by_sku: dict[str, str] = {}

        async def product(p: Product) -> None:
            problem = await _product(request, reason, store, p)
            if problem:
                errors_by_sku[p.sku] = problem

        if error is None:
            await net.run_all(product(p) for p in products)
        for state in owing:
            named = {line.sku for push in (*state.commerce.orders, *state.commerce.carts)  # type: ignore[union-attr]
                     for line in push.lines}
            fail(state, error or next((errors_by_sku[s] for s in sorted(named) if s in errors_by_sku), None))
    owing = [s for s in owing if s.contact_id not in errors]

    async def sequence(state: ContactState) -> None:
        commerce = state.commerce
        assert commerce is not None
        steps: list[Callable[[], Awaitable[str | None]]] = []
        if store is not None:
            # A new first order carries the customer itself (Mailchimp creates or updates it): one call, not two.
            inline = commerce.customer is not None and bool(commerce.orders) and not commerce.orders[0].known
            if commerce.customer and not inline:
                steps.append(lambda: _customer(request, reason, store, state))
            steps += [lambda o=o, first=i == 0: _order(request, reason, store, state, o,  # type: ignore[misc]
                                                       with_customer=inline and first)
                      for i, o in enumerate(commerce.orders)]
            steps += [lambda c=c: _cart(request, reason, store, state, c) for c in commerce.carts]  # type: ignore[misc]
        steps += [lambda e=e: _event(request, reason, state, e) for e in commerce.events]  # type: ignore[misc]
        for step in steps:
            if not fail(state, await step()):
                return

    await net.run_all(sequence(s) for s in owing)


def requests_of(store: MailchimpStore | None, state: ContactState, products: set[str]) -> float:
    """The requests `push_commerce` makes for this state: its products not in `products` (counted already by the
    batch; added to it), a new one 1 and a known one 2 (title, then variant), the customer unless it rides in a new
    first order, 1 per order and cart, and each event once per audience the person is subscribed to."""
    commerce = state.commerce
    if commerce is None:
        return 0
    audiences = 0 if state.marketing_blocked else sum(1 for status in state.lists.values() if status == "subscribed")
    cost = len(commerce.events) * audiences
    if store is None:
        return cost
    new = [p for p in commerce.products if p.sku not in products]
    products.update(p.sku for p in new)
    inline = commerce.customer is not None and bool(commerce.orders) and not commerce.orders[0].known
    customer = 1 if commerce.customer is not None and not inline else 0
    return cost + sum(2 if p.known else 1 for p in new) + customer + len(commerce.orders) + len(commerce.carts)


_COLLECTIONS = {"cart": "carts", "order": "orders", "customer": "customers"}


async def forget(request: Request, reason: Reason, store: MailchimpStore | None, erasure: Erasure) -> str | None:
    """The person's carts, orders and customer deleted from the store, in that order (404: already gone). Deleting
    the customer is not documented to delete its orders: each order (what they bought, when, for how much) goes."""
    if store is None:
        return None
    error = None
    for kind, ref in erasure.commerce:  # every record, whatever one of them answers
        path = store.path(_COLLECTIONS[kind], ref)
        response = await request("DELETE", path)
        if response.status_code not in (204, 404):
            error = error or reason(f"{kind} deletion", response)
    return error


async def _ensure_store(request: Request, reason: Reason, account: str, store: MailchimpStore,
                        states: Sequence[ContactState]) -> str | None:
    if (account, store.id) in _stores:
        return None
    response = await request("GET", store.path())
    if response.status_code == 404:
        currency = store.currency or next((p.currency for s in states
                                           for p in (*s.commerce.orders, *s.commerce.carts)), None)  # type: ignore[union-attr]
        if store.list_id is None or currency is None:
            return "Mailchimp store: missing, and no audience (store_list_id) or currency to create it with"
        response = await request("POST", "/ecommerce/stores", json={
            "id": store.id, "list_id": store.list_id, "name": store.id, "currency_code": currency})
        if response.status_code == 400:
            # Another lane or worker created it between our look and our write (the 100k drain dead-lettered a
            # whole batch on this): it is there if Mailchimp now shows it.
            response = await request("GET", store.path())
    if response.status_code != 200:
        return reason("store", response)
    _stores.add((account, store.id))
    return None


async def _product(request: Request, reason: Reason, store: MailchimpStore, product: Product) -> str | None:
    title = product.name or product.sku
    variant: dict[str, Any] = {"id": product.sku, "title": title, "sku": product.sku, "price": amount(product.price)}
    if not product.known:
        body: dict[str, Any] = {"id": product.sku, "title": title, "variants": [variant]}
        if product.category:
            body["type"] = product.category
        response = await request("POST", store.path("products"), json=body)
        if response.status_code == 200:
            return None
        if response.status_code != 400:  # 400: it exists already (another lane, an earlier life): updated below
            return reason("product", response)
    patch: dict[str, Any] = {"title": title, **({"type": product.category} if product.category else {})}
    response = await request("PATCH", store.path("products", product.sku), json=patch)
    if response.status_code != 200:
        return reason("product update", response)
    response = await request("PUT", store.path("products", product.sku, "variants", product.sku), json=variant)
    return None if response.status_code == 200 else reason("product variant", response)


async def _customer(request: Request, reason: Reason, store: MailchimpStore, state: ContactState) -> str | None:
    response = await request("PUT", store.path("customers", str(state.contact_id)), json=_customer_body(store, state))
    return None if response.status_code == 200 else reason("customer", response)


def _customer_body(store: MailchimpStore, state: ContactState) -> dict[str, Any]:
    return {"id": str(state.contact_id), "email_address": state.email, "opt_in_status": _opt_in(store, state)}


def _opt_in(store: MailchimpStore, state: ContactState) -> bool:
    """The member's state on the store's audience: Mailchimp applies it to new members only (never a subscription
    Carnet did not make: a member pending or unsubscribed stays so)."""
    return not state.marketing_blocked and store.list_id is not None and state.lists.get(store.list_id) == "subscribed"


def _lines(lines: Sequence[Line], *, ids: bool = True) -> list[dict[str, Any]]:
    """Mailchimp's line `price` is the line's total (unit price times quantity); an order update's lines carry no
    id (E_commerce_Order_2), the lines of a cart update do (E_commerce_Cart_2)."""
    return [{**({"id": str(i)} if ids else {}), "product_id": line.sku, "product_variant_id": line.sku,
             "quantity": line.quantity, "price": amount(line.unit_price * line.quantity)}
            for i, line in enumerate(lines, 1)]


async def _order(request: Request, reason: Reason, store: MailchimpStore, state: ContactState,
                 order: OrderPush, *, with_customer: bool = False) -> str | None:
    body: dict[str, Any] = {
        "currency_code": order.currency, "order_total": amount(order.total),
        "financial_status": _FINANCIAL.get(order.status, "pending"),
        "processed_at_foreign": order.placed_at.isoformat(), "updated_at_foreign": order.updated_at.isoformat(),
    }
    if order.status in _SHIPPED:
        body["fulfillment_status"] = "shipped"
    if order.status == "cancelled":
        body["cancelled_at_foreign"] = order.updated_at.isoformat()
    if not order.known:
        response = await request("POST", store.path("orders"), json={
            "id": order.external_id, "lines": _lines(order.lines), **body,
            "customer": _customer_body(store, state) if with_customer else {"id": str(state.contact_id)}})
        if response.status_code == 200:
            return None
        if response.status_code != 400:  # 400: there already (a retry after a lost answer): updated below
            return reason("order", response)
    response = await request("PATCH", store.path("orders", order.external_id),
                             json={**body, "lines": _lines(order.lines, ids=False)})
    return None if response.status_code == 200 else reason("order update", response)


async def _cart(request: Request, reason: Reason, store: MailchimpStore, state: ContactState,
                cart: CartPush) -> str | None:
    if cart.status == "removed":
        response = await request("DELETE", store.path("carts", cart.external_id))
        return None if response.status_code in (204, 404) else reason("cart deletion", response)
    body: dict[str, Any] = {"customer": _customer_body(store, state), "currency_code": cart.currency,
                            "order_total": amount(cart.total), "lines": _lines(cart.lines)}
    if cart.checkout_url:
        body["checkout_url"] = cart.checkout_url
    if not cart.known:
        response = await request("POST", store.path("carts"), json={"id": cart.external_id, **body})
        if response.status_code == 200:
            return None
        if response.status_code != 400:
            return reason("cart", response)
    response = await request("PATCH", store.path("carts", cart.external_id), json=body)
    return None if response.status_code == 200 else reason("cart update", response)


async def _event(request: Request, reason: Reason, state: ContactState, event: EventPush) -> str | None:
    body = {"name": event.type.replace(".", "_"), "occurred_at": event.occurred_at.isoformat(),
            "properties": {k: v if isinstance(v, str) else _text(v) for k, v in event.properties.items()}}
    for list_id, status in state.lists.items():
        if status == "subscribed" and not state.marketing_blocked:
            response = await request("POST", f"/lists/{list_id}/members/{subscriber_hash(state.email)}/events",
                                     json=body)
            if response.status_code != 204:
                return reason("event", response)
    return None


def _text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
