"""Stored first responses of POSTs sent with an Idempotency-Key."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Column
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["IdempotencyRecord"]


class IdempotencyRecord(SQLModel, table=True):
    __tablename__: ClassVar[str] = "idempotency_record"  # type: ignore[misc]

    subject: str = Field(primary_key=True)
    key: str = Field(primary_key=True)
    token_id: str | None = None          # the token the response was sent to: the only one it is replayed to
    method: str
    path: str
    request_hash: str
    status_code: int | None = None
    response_body: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    response_headers: dict[str, str] | None = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ, index=True)
