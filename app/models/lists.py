"""Marketing lists and the memberships of contacts in them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import CheckConstraint, Column, ForeignKey, Index, Text, Uuid, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
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
    # Browser signups (POST /v1/public/lists/{id}/signup): off unless the list opts in, from these exact origins,
    # with this consent text (kept as the proof's wording) under this policy version.
    public_signup: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})
    signup_origins: list[str] = Field(
        default_factory=list, sa_column=Column(ARRAY(Text), nullable=False, server_default=text("'{}'")))
    signup_wording: str | None = None
    signup_policy_version: str | None = None
    # What people see on public pages instead of the internal name, and the accent colour (#rrggbb) of its pages.
    display_name: str | None = None
    color: str | None = None
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
    # A public signup waiting for its confirmation: the request's proof. The grant goes on the ledger when the
    # person confirms (an unconfirmed form must not lift an opt-out); cleared then, or when the row leaves pending.
    pending_proof: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
