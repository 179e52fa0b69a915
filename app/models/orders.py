"""Orders and behaviour events: what contacts buy and do."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import BigInteger, CheckConstraint, Column, Identity, Index, Numeric
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["CART_STATUSES", "Cart", "Event", "EventKey", "Order"]

CART_STATUSES = ("open", "converted", "abandoned")


class Order(SQLModel, table=True):
    __tablename__: ClassVar[str] = "order"  # type: ignore[misc]
    __table_args__ = (
        Index("ix_order_contact_id_placed_at", "contact_id", "placed_at"),
        Index("ix_order_items", "items", postgresql_using="gin", postgresql_ops={"items": "jsonb_path_ops"}),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    external_id: str = Field(unique=True)
    contact_id: uuid.UUID = Field(foreign_key="contact.id")
    placed_at: datetime = Field(sa_type=TZ)
    status: str
    currency: str
    total_amount: Decimal = Field(sa_type=Numeric(14, 2))
    channel: str | None = None
    items: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    cart_external_id: str | None = None          # the cart this order converted (closed), if the shop said
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class Cart(SQLModel, table=True):
    """A shopping cart: what the emailing tools' abandoned-cart automations read (docs/sync.md)."""

    __tablename__: ClassVar[str] = "cart"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("status IN ('open', 'converted', 'abandoned')", name="status"),
        Index("ix_cart_contact_id_opened_at", "contact_id", "opened_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    external_id: str = Field(unique=True)
    contact_id: uuid.UUID = Field(foreign_key="contact.id")
    status: str = "open"
    currency: str
    total_amount: Decimal = Field(sa_type=Numeric(14, 2))
    items: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    checkout_url: str | None = None
    opened_at: datetime = Field(sa_type=TZ)                       # the shop's clock
    closed_at: datetime | None = Field(default=None, sa_type=TZ)  # converted or abandoned
    order_external_id: str | None = None                          # the order that converted it
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class Event(SQLModel, table=True):
    """A behaviour event, in monthly partitions of `occurred_at` (app.services.event_partitions).

    The primary key includes `occurred_at` (a partitioned table's unique keys must hold the partition key); the
    sender's `event_id` is kept unique across partitions by `EventKey`.
    """

    __tablename__: ClassVar[str] = "event"  # type: ignore[misc]
    __table_args__ = (
        Index("ix_event_contact_id_occurred_at", "contact_id", "occurred_at"),
        Index("ix_event_type_occurred_at", "type", "occurred_at"),
        {"postgresql_partition_by": "RANGE (occurred_at)"},
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    event_id: str | None = None
    contact_id: uuid.UUID = Field(foreign_key="contact.id")
    type: str
    occurred_at: datetime = Field(sa_column=Column(TZ, primary_key=True))
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class EventKey(SQLModel, table=True):
    """One row per stored event that carries an `event_id`: the dedupe key across every partition of `event`.

    Written in the same statement as the event; `id` and `occurred_at` find the stored event (one partition).
    No other index: retention deletes a dropped month's keys by joining its partition's event_ids (each insert
    pays for every index here, and this table takes one row per event).
    """

    __tablename__: ClassVar[str] = "event_key"  # type: ignore[misc]

    event_id: str = Field(primary_key=True)
    id: int = Field(sa_type=BigInteger)
    occurred_at: datetime = Field(sa_type=TZ)
