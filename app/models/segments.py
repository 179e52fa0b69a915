"""Segments: saved, dynamic filters over contacts (compiled by app.services.segments)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Column, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["Segment"]


class Segment(SQLModel, table=True):
    __tablename__: ClassVar[str] = "segment"  # type: ignore[misc]

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    name: str = Field(unique=True)
    filter: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    description: str | None = None
    version: int = Field(default=1, sa_column_kwargs={"server_default": text("1")})
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
