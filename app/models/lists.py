"""Marketing lists and the memberships of contacts in them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar

from sqlalchemy import CheckConstraint, Column, ForeignKey, Index, Text, Uuid
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["ListMembership", "MailingList"]


class MailingList(SQLModel, table=True):
    """A marketing audience (`newsletter`, `vip-offers`, ...)."""

    __tablename__: ClassVar[str] = "list"  # type: ignore[misc]

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    name: str = Field(unique=True)
    description: str | None = None
    double_opt_in: bool = False
    # NULL: every contact kind is accepted.
    accepted_kinds: list[str] | None = Field(default=None, sa_column=Column(ARRAY(Text), nullable=True))
    version: int = 1
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class ListMembership(SQLModel, table=True):
    """One contact in one list. Unsubscribing keeps the row (status `unsubscribed`): it is the proof."""

    __tablename__: ClassVar[str] = "list_membership"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'subscribed', 'unsubscribed')", name="status"),
        # Member pages (keyset on contact_id) and the per-status counts of a list.
        Index("ix_list_membership_list_id_status_contact_id", "list_id", "status", "contact_id"),
    )

    # Deleting a list deletes its memberships; the consent ledger is untouched.
    list_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("list.id", ondelete="CASCADE"), primary_key=True))
    contact_id: uuid.UUID = Field(foreign_key="contact.id", primary_key=True, index=True)
    status: str
    source: str | None = None
    subscribed_at: datetime | None = Field(default=None, sa_type=TZ)
    unsubscribed_at: datetime | None = Field(default=None, sa_type=TZ)
    pending_since: datetime | None = Field(default=None, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
