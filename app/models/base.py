"""Shared column helpers for the table models."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime

from app.ids import new_id

__all__ = ["TZ", "new_id", "utc_now"]

TZ = DateTime(timezone=True)


def utc_now() -> datetime:
    return datetime.now(UTC)
