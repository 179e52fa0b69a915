"""Issued access tokens: the audit of who issued and revoked what, and the revocation list."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import Column, Text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["AccessToken"]


class AccessToken(SQLModel, table=True):
    __tablename__: ClassVar[str] = "access_token"  # type: ignore[misc]

    jti: str = Field(primary_key=True)
    subject: str
    role: str
    scopes: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    issued_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    expires_at: datetime = Field(sa_type=TZ, index=True)
    issued_by: str
    revoked_at: datetime | None = Field(default=None, sa_type=TZ)
    revoked_by: str | None = None
