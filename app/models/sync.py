"""Destinations (emailing tools, webhook receivers) and the deliveries the worker owes them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, CheckConstraint, Column, ForeignKey, Identity, Index, Text, Uuid, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["COMMERCE_KINDS", "DELIVERY_STATUSES", "DESTINATION_KINDS", "CommerceRecord", "Delivery",
           "Destination", "RetiredRef", "SyncLink",
           "WorkerHeartbeat"]

DESTINATION_KINDS = ("brevo", "mailchimp", "webhook")
DELIVERY_STATUSES = ("pending", "in_flight", "delivered", "dead")
COMMERCE_KINDS = ("product", "order", "cart", "customer", "event")


class Destination(SQLModel, table=True):
    __tablename__: ClassVar[str] = "destination"  # type: ignore[misc]
    __table_args__ = (CheckConstraint("kind IN ('brevo', 'mailchimp', 'webhook')", name="kind"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    kind: str
    name: str = Field(unique=True)
    enabled: bool = True
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))  # no secrets
    secrets: str | None = None           # Fernet token of a JSON object (app.security.secrets)
    list_mappings: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    field_mappings: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    # [{segment_id, remote_list_id, tag}]: segments synced as a Brevo list, a Mailchimp tag, webhook events.
    segment_mappings: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(
        JSONB, nullable=False, server_default=text("'[]'::jsonb")))
    # Health, written by the worker; last_error never carries personal data.
    last_success_at: datetime | None = Field(default=None, sa_type=TZ)
    last_error_at: datetime | None = Field(default=None, sa_type=TZ)
    last_error: str | None = None
    consecutive_failures: int = 0
    disabled_reason: str | None = None   # set when the receiver said 410 Gone
    version: int = 1
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class Delivery(SQLModel, table=True):
    """What one destination still owes (or got) for one contact (vendors) or one outbox message (webhooks).

    Vendor deliveries *coalesce*: at most one pending row per (destination, contact) — a burst of changes
    is one push of the latest state. Head of line per (destination, contact): a row is claimable only when
    no other row of that pair is in flight and no older one is pending, which keeps one contact's changes
    in order across any number of workers.
    """

    __tablename__: ClassVar[str] = "delivery"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'in_flight', 'delivered', 'dead')", name="status"),
        Index("ix_delivery_claim", "destination_id", "next_attempt_at", "id",
              postgresql_where=text("status = 'pending'")),
        Index("ix_delivery_destination_id_contact_id_id", "destination_id", "contact_id", "id"),
        Index("ix_delivery_destination_id_status_id", "destination_id", "status", "id"),
        Index("ix_delivery_in_flight_lease", "lease_until", postgresql_where=text("status = 'in_flight'")),
        Index("uq_delivery_one_pending_state", "destination_id", "contact_id", unique=True,
              postgresql_where=text("status = 'pending' AND coalesces")),
        # Retention (app.services.outbox_retention): the delivered, oldest first; and, per outbox message, the
        # deliveries that still need it (a message is kept while one of them is not delivered).
        Index("ix_delivery_delivered_at", "delivered_at", "id", postgresql_where=text("status = 'delivered'")),
        Index("ix_delivery_message_id_undelivered", "message_id", postgresql_where=text("status <> 'delivered'")),
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    destination_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("destination.id", ondelete="CASCADE"),
                                                       nullable=False))
    contact_id: uuid.UUID | None = None          # no foreign key: an erasure is delivered after the row is gone
    message_id: int = Field(sa_column=Column(BigInteger, nullable=False))  # outbox message (latest, when coalesced)
    topic: str
    coalesces: bool = False                      # vendor state push (True) or webhook event (False)
    # Vendors: False while only list memberships changed since the last push (the profile write can be skipped).
    profile_changed: bool = True
    # Vendors: Carnet lists whose membership changed since the last push (an explicit status goes out only
    # for these; the others are sent as `status_if_new`, so a vendor-side unsubscribe is never overridden),
    # and `segment:<id>` for each synced segment the contact entered or left.
    changed_lists: list[str] = Field(default_factory=list, sa_column=Column(ARRAY(Text), nullable=False))
    status: str = "pending"
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    lease_until: datetime | None = Field(default=None, sa_type=TZ)
    last_error: str | None = None
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    delivered_at: datetime | None = Field(default=None, sa_type=TZ)


class SyncLink(SQLModel, table=True):
    """The remote identity of a contact at a vendor (Mailchimp subscriber hash, Brevo contact id).

    Kept after an erasure only until the vendor confirmed the deletion, so the deletion can address it.
    """

    __tablename__: ClassVar[str] = "sync_link"  # type: ignore[misc]
    # Who else holds a remote record: a ref is never renamed or deleted for one contact while another has it.
    __table_args__ = (Index("ix_sync_link_destination_id_remote_ref", "destination_id", "remote_ref"),)

    destination_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("destination.id", ondelete="CASCADE"),
                                                       primary_key=True))
    contact_id: uuid.UUID = Field(primary_key=True)
    remote_ref: str
    synced_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    # The contact's tags as last pushed (NULL: not known), so tags removed since can be removed remotely.
    tags: list[str] | None = Field(default=None, sa_column=Column(ARRAY(Text), nullable=True))


class RetiredRef(SQLModel, table=True):
    """A remote record the vendor keeps for a person though it no longer carries their current address.

    Mailchimp archives (restorable) the member of an address retired by a merge, or of a former address that
    could not be moved onto the new one: `contact_id` is the contact whose record it was (the merged-away one).
    An erasure of the person, or of anyone it was merged into, deletes it permanently, then forgets this row;
    so does the address coming back (another contact's push takes the record over: the row goes).
    """

    __tablename__: ClassVar[str] = "sync_retired_ref"  # type: ignore[misc]
    __table_args__ = (Index("ix_sync_retired_ref_destination_id_remote_ref", "destination_id", "remote_ref"),)

    destination_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("destination.id", ondelete="CASCADE"),
                                                       primary_key=True))
    contact_id: uuid.UUID = Field(primary_key=True)   # no foreign key: that contact is usually gone
    remote_ref: str = Field(sa_column=Column(Text, primary_key=True))
    retired_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class WorkerHeartbeat(SQLModel, table=True):
    """A worker process alive at `seen_at`: the live ones split each vendor account's limits between them."""

    __tablename__: ClassVar[str] = "worker_heartbeat"  # type: ignore[misc]

    worker_id: str = Field(sa_column=Column(Text, primary_key=True))  # host:pid:random, never reused
    seen_at: datetime = Field(sa_type=TZ)


class CommerceRecord(SQLModel, table=True):
    """A commerce record as last pushed to a vendor destination (app/sync/commerce.py).

    `digest` is what was sent (a hash of the vendor payload, or for `event` the last event id pushed), so a push
    sends only what is new or changed, and a product goes before the first order or cart that names it. Rows of
    a person (`contact_id`) are what an erasure deletes at the vendor (Mailchimp customer and carts).
    """

    __tablename__: ClassVar[str] = "sync_commerce"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("kind IN ('product', 'order', 'cart', 'customer', 'event')", name="kind"),
        Index("ix_sync_commerce_destination_id_contact_id", "destination_id", "contact_id"),
    )

    destination_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("destination.id", ondelete="CASCADE"),
                                                       primary_key=True))
    kind: str = Field(sa_column=Column(Text, primary_key=True))
    ref: str = Field(sa_column=Column(Text, primary_key=True))      # sku, order/cart external id, contact id
    contact_id: uuid.UUID | None = None   # no foreign key: kept until the vendor confirmed the person's erasure
    digest: str
    synced_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
