"""Suppression entries: keyed hashes of erased people's addresses and customer numbers, so they are never re-added."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import CheckConstraint, Column, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["Suppression"]


class Suppression(SQLModel, table=True):
    """One erased email, phone or customer number (external_id): HMAC-SHA256 of the normalized value, never the value.

    A release (the person came back with a fresh consent) keeps the row as the record of why,
    with `released_at` set; only rows with `released_at` NULL suppress.
    """

    __tablename__: ClassVar[str] = "suppression"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("kind IN ('email', 'phone', 'external_id')", name="kind"),
        CheckConstraint("reason IN ('erasure', 'retention')", name="reason"),
        UniqueConstraint("kind", "digest"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    kind: str
    digest: str                                        # hex HMAC-SHA256 (key derived from the deployment secret)
    reason: str
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    released_at: datetime | None = Field(default=None, sa_type=TZ)
    released_by: str | None = None                     # token subject of the admin who released it
    # The fresh consent proof the person gave to come back: {ip, user_agent, form_url, wording, policy_version}
    release_proof: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
