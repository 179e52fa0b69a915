"""Segments: saved, dynamic filters over contacts (compiled by app.services.segments)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Column, ForeignKey, ForeignKeyConstraint, Index, Uuid, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["Segment", "SegmentMember", "SegmentSync"]


class Segment(SQLModel, table=True):
    __tablename__: ClassVar[str] = "segment"  # type: ignore[misc]

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    name: str = Field(unique=True)
    filter: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    description: str | None = None
    version: int = Field(default=1, sa_column_kwargs={"server_default": text("1")})
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class SegmentSync(SQLModel, table=True):
    """One segment mapped by one destination: when its snapshot was last brought up to date.

    Deleted with the mapping (app.services.segment_sync.apply_mappings), and its snapshot with it.
    """

    __tablename__: ClassVar[str] = "segment_sync"  # type: ignore[misc]
    __table_args__ = (Index("ix_segment_sync_segment_id", "segment_id"),)

    destination_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("destination.id", ondelete="CASCADE"),
                                                       primary_key=True))
    segment_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("segment.id", ondelete="CASCADE"),
                                                   primary_key=True))
    refreshed_at: datetime | None = Field(default=None, sa_type=TZ)   # the last good refresh; None: never, or due now
    members: int = Field(default=0, sa_column_kwargs={"server_default": text("0")})
    # The last refresh failed (invalid_filter, statement_timeout): until a good one, or a new filter (migration 0031).
    last_error: str | None = Field(default=None, max_length=32)
    failed_at: datetime | None = Field(default=None, sa_type=TZ)


class SegmentMember(SQLModel, table=True):
    """The membership snapshot of a synced segment, per destination (app.services.segment_sync).

    A segment is a query, so who entered and who left is only known by comparing two answers: this is the
    previous answer. Per destination, so a destination that maps a segment later gets every member as news.
    """

    __tablename__: ClassVar[str] = "segment_member"  # type: ignore[misc]
    __table_args__ = (
        ForeignKeyConstraint(["destination_id", "segment_id"],
                             ["segment_sync.destination_id", "segment_sync.segment_id"], ondelete="CASCADE"),
        Index("ix_segment_member_contact_id", "contact_id"),
    )

    destination_id: uuid.UUID = Field(primary_key=True)
    segment_id: uuid.UUID = Field(primary_key=True)
    contact_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("contact.id", ondelete="CASCADE"),
                                                   primary_key=True))
    entered_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
