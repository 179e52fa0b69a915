"""Messages for the outside world, written in the same transaction as the change they announce."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, Column, Identity, Index, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["OutboxMessage"]


class OutboxMessage(SQLModel, table=True):
    __tablename__: ClassVar[str] = "outbox_message"  # type: ignore[misc]
    __table_args__ = (Index("ix_outbox_message_undispatched", "id", postgresql_where=text("dispatched_at IS NULL")),)

    # The primary key index on id is the delivery order.
    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    topic: str                                         # dotted noun.past_verb, e.g. membership.confirmation_requested
    contact_id: uuid.UUID | None = None                # no foreign key: a message may outlive an erased contact
    payload: Any = Field(default=None, sa_column=Column(JSONB, nullable=False))
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    # Set when the worker has turned the message into deliveries (NULL: still to dispatch).
    dispatched_at: datetime | None = Field(default=None, sa_type=TZ)
