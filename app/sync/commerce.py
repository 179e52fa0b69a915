"""Commerce data for the emailing tools: what one push carries besides the contact (docs/sync.md, "Commerce").

Synced by state, like contacts: `app.services.commerce` reads each pushed contact's orders, carts and events that
the destination has not received in their current form (`sync_commerce` keeps a digest of what it last sent), and
the products their lines name; the adapter sends products first, then orders, carts and events, and answers which
records went (`Outcome.commerce`), which the worker remembers. A retry or a replay sends the same state again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

__all__ = ["CartPush", "CommerceState", "EventPush", "Line", "OrderPush", "Product", "Record", "amount", "digest",
           "lines_of", "products_of"]


@dataclass(frozen=True, slots=True)
class Product:
    """A product as the shop's order and cart lines describe it (the latest line wins)."""

    sku: str
    name: str | None
    category: str | None
    price: Decimal
    known: bool = False             # sent to this destination before (an update)


@dataclass(frozen=True, slots=True)
class Line:
    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class OrderPush:
    external_id: str
    status: str                     # placed, paid, shipped, delivered, cancelled, refunded
    currency: str
    total: Decimal
    placed_at: datetime
    updated_at: datetime
    lines: tuple[Line, ...]
    known: bool                     # sent to this destination before (an update, not a creation)


@dataclass(frozen=True, slots=True)
class CartPush:
    external_id: str
    status: str                     # open, abandoned: pushed; converted: removed at the vendor
    currency: str
    total: Decimal
    checkout_url: str | None
    lines: tuple[Line, ...]
    known: bool


@dataclass(frozen=True, slots=True)
class EventPush:
    id: int
    type: str
    occurred_at: datetime
    properties: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Record:
    """A commerce record the vendor now holds as Carnet sent it (`sync_commerce`)."""

    kind: str                       # product, order, cart, customer, event
    ref: str
    contact_id: uuid.UUID | None
    digest: str


@dataclass(frozen=True, slots=True)
class CommerceState:
    """What one contact's push owes the vendor's e-commerce side. `may_market`: a current email_marketing grant
    (carts and events were only planned with it; Brevo sends orders of others as historical, no automation)."""

    may_market: bool
    products: tuple[Product, ...] = ()          # new or changed, named by the lines below
    orders: tuple[OrderPush, ...] = ()          # oldest first
    carts: tuple[CartPush, ...] = ()
    events: tuple[EventPush, ...] = ()
    customer: Record | None = None              # Mailchimp: the customer record to (re)write
    records: tuple[Record, ...] = field(default=())  # what to remember once the vendor took it all

    @property
    def empty(self) -> bool:
        return not (self.orders or self.carts or self.events or self.customer)

    def requests(self, per_batch: int) -> float:
        """Requests this costs a vendor that batches `per_batch` products or orders per call (1: one each)."""
        return ((len(self.products) + len(self.orders)) / per_batch + len(self.carts) + len(self.events)
                + (1 if self.customer else 0))


def digest(payload: Any) -> str:
    """A short fingerprint of what was sent (a change of price, name or status changes it)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def amount(value: Decimal) -> float:
    """A money amount as the vendors' JSON number (cents are exact in a double up to 2^53)."""
    return float(value)


def lines_of(items: Sequence[Mapping[str, Any]]) -> tuple[Line, ...]:
    return tuple(Line(str(i["sku"]), int(i["quantity"]), Decimal(str(i["unit_price"]))) for i in items)


def products_of(states: Sequence[Any]) -> list[Product]:
    """The products a batch of states names, once each (the first state's view; all come from one plan)."""
    seen: dict[str, Product] = {}
    for state in states:
        for product in state.commerce.products if state.commerce else ():
            seen.setdefault(product.sku, product)
    return list(seen.values())
