"""Field-level history: one row per changed field of a contact."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, Column, Identity, Index
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["ContactHistory"]


class ContactHistory(SQLModel, table=True):
    __tablename__: ClassVar[str] = "contact_history"  # type: ignore[misc]
    __table_args__ = (Index("ix_contact_history_contact_id_id", "contact_id", "id"),)

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    contact_id: uuid.UUID = Field(foreign_key="contact.id")
    field: str
    old_value: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    new_value: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    subject: str
    via: str
    at: datetime = Field(default_factory=utc_now, sa_type=TZ)
