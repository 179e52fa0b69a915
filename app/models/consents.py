"""The consent ledger: append-only events per contact and purpose.

A trigger refuses DELETE always and UPDATE except the de-identification done by an erasure (migration 0005).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, CheckConstraint, Column, Identity, Index
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["ConsentEvent"]


class ConsentEvent(SQLModel, table=True):
    __tablename__: ClassVar[str] = "consent_event"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("action IN ('granted', 'withdrawn', 'confirmed')", name="action"),
        Index("ix_consent_event_contact_id_purpose_occurred_at", "contact_id", "purpose", "occurred_at"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    # NULL once the contact was erased: the event stays, de-identified (migration 0005, services/gdpr.py)
    contact_id: uuid.UUID | None = Field(default=None, foreign_key="contact.id")
    purpose: str                                       # a ConsentPurpose, or `list_subscription` (below)
    action: str
    # The list the event is about: a grant given while subscribing to it, or (purpose `list_subscription`) leaving
    # that list alone, which never changes the state of a purpose. No foreign key: a deleted list's events stay.
    list_id: uuid.UUID | None = None
    source: str | None = None
    occurred_at: datetime = Field(sa_type=TZ)          # when the person acted (may be earlier than recorded_at)
    recorded_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    recorded_by: str                                   # token subject, or `link:confirm` / `link:unsubscribe`
    # {ip, user_agent, form_url, wording, policy_version}; NULL when none was given
    proof: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
