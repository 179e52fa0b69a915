"""Shared column helpers for the table models."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import DateTime

__all__ = ["TZ", "new_id", "utc_now"]

TZ = DateTime(timezone=True)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def utc_now() -> datetime:
    return datetime.now(UTC)
