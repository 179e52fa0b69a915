"""The outbox: what the outside world must learn, written in the caller's transaction (delivery comes later)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import OutboxMessage
from app.models.base import utc_now

__all__ = ["add", "add_many"]

_t = OutboxMessage.__table__  # type: ignore[attr-defined]


async def add(session: AsyncSession, topic: str, *, contact_id: uuid.UUID | None, payload: Mapping[str, Any]) -> None:
    await add_many(session, topic, [(contact_id, payload)])


async def add_many(
    session: AsyncSession, topic: str, messages: Sequence[tuple[uuid.UUID | None, Mapping[str, Any]]]
) -> None:
    """One statement for many messages of one topic. Payloads carry ids, never personal data."""
    if not messages:
        return
    now = utc_now()
    await session.execute(
        insert(_t),
        [{"topic": topic, "contact_id": contact_id, "payload": dict(payload), "created_at": now}
         for contact_id, payload in messages],
    )
