"""Segments: saved, dynamic filters over contacts (compiled by app.services.segments)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Column, ForeignKey, Index, Uuid, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["Segment", "SegmentMember"]


class Segment(SQLModel, table=True):
    __tablename__: ClassVar[str] = "segment"  # type: ignore[misc]

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    name: str = Field(unique=True)
    filter: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    description: str | None = None
    version: int = Field(default=1, sa_column_kwargs={"server_default": text("1")})
    # When the membership snapshot of a synced segment was last brought up to date (None: never, or due now).
    refreshed_at: datetime | None = Field(default=None, sa_type=TZ)
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class SegmentMember(SQLModel, table=True):
    """The membership snapshot of a segment that a destination syncs (app.services.segment_sync).

    A segment is a query, so who enters and who leaves is only known by comparing two answers: this is the
    previous answer. Only segments mapped by a destination have rows.
    """

    __tablename__: ClassVar[str] = "segment_member"  # type: ignore[misc]
    __table_args__ = (Index("ix_segment_member_contact_id", "contact_id"),)

    segment_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("segment.id", ondelete="CASCADE"),
                                                   primary_key=True))
    contact_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("contact.id", ondelete="CASCADE"),
                                                   primary_key=True))
    entered_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
