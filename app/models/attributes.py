"""Custom attribute definitions that type `contact.attributes`."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import Column, Text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["AttributeDefinition", "Tag"]


class AttributeDefinition(SQLModel, table=True):
    __tablename__: ClassVar[str] = "attribute_definition"  # type: ignore[misc]

    name: str = Field(primary_key=True)
    type: str
    options: list[str] | None = Field(default=None, sa_column=Column(ARRAY(Text)))
    description: str | None = None
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class Tag(SQLModel, table=True):
    __tablename__: ClassVar[str] = "tag"  # type: ignore[misc]

    name: str = Field(primary_key=True)
    description: str | None = None
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
