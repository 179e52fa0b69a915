"""Erasure requests people file from the preference center, for an admin to act on (GDPR art. 17, 12(3)).

A request names the contact by id only: nothing personal is kept in it, so it can outlive the erasure as the
record that the person's request was answered, and when.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar

from sqlalchemy import CheckConstraint, Index, text
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["ErasureRequest"]


class ErasureRequest(SQLModel, table=True):
    __tablename__: ClassVar[str] = "erasure_request"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("status IN ('open', 'completed', 'refused')", name="status"),
        # One open request per person: asking twice files nothing new.
        Index("ix_erasure_request_contact_id_open", "contact_id", unique=True,
              postgresql_where=text("status = 'open'")),
        Index("ix_erasure_request_status_requested_at", "status", "requested_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    contact_id: uuid.UUID                              # no foreign key: the request outlives the erased contact
    status: str = "open"
    source: str = "preference_center"
    requested_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    resolved_at: datetime | None = Field(default=None, sa_type=TZ)
    resolved_by: str | None = None                     # token subject, or `self_service` (erased at once)
    note: str | None = None                            # why a request was refused (art. 17(3))
