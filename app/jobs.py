"""Periodic jobs run inside the API process until the worker exists: each is idempotent and set-based."""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.logging import get_logger
from app.security import Principal, Role
from app.services import orders as orders_service

__all__ = ["JOB_ACTOR", "refresh_lifecycle_stages", "run_periodically"]

log = get_logger("carnet.jobs")
JOB_ACTOR = Principal("carnet-lifecycle-job", Role.ADMIN, frozenset(), "job")


async def refresh_lifecycle_stages(
    sessions: async_sessionmaker[AsyncSession], policy: orders_service.LifecyclePolicy
) -> int:
    """Stages that changed with time alone (lapsed customers); safe to run in several processes at once."""
    async with sessions.begin() as session:
        return await orders_service.refresh_aged_stages(session, policy=policy, actor=JOB_ACTOR)


async def run_periodically(
    sessions: async_sessionmaker[AsyncSession], policy: orders_service.LifecyclePolicy, *, every_seconds: float
) -> None:
    while True:
        with contextlib.suppress(OSError, DBAPIError):  # the database may be away; try again next round
            changed = await refresh_lifecycle_stages(sessions, policy)
            log.info("lifecycle.refreshed", changed=changed)
        await asyncio.sleep(every_seconds)
