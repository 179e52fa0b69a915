"""Emptying every table after tests that committed, while a live worker may still be polling.

TRUNCATE takes its table locks one by one: the worker's transaction may hold one of them and wait for another,
and PostgreSQL ends one side as a deadlock (40P01). The emptying is tried again; the worker's side retries on
its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import metadata

__all__ = ["EVERY_TABLE", "empty_every_table", "execute_alone"]

EVERY_TABLE = ", ".join(f'"{name}"' for name in sorted(metadata.tables))  # quoted: "order" is a keyword
_DEADLOCK = "40P01"


async def empty_every_table(execute: Callable[[str], Awaitable[object]], *, attempts: int = 10) -> None:
    """TRUNCATE every table through `execute` (one statement, its own transaction), again after a deadlock."""
    for attempt in range(attempts):
        try:
            await execute(f"TRUNCATE {EVERY_TABLE} CASCADE")
            return
        except Exception as error:  # asyncpg's own error, or SQLAlchemy's wrapping it: both carry the code
            if (getattr(error, "sqlstate", None) != _DEADLOCK and getattr(
                    getattr(error, "orig", None), "sqlstate", None) != _DEADLOCK) or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))


async def execute_alone(engine: AsyncEngine, sql: str) -> None:
    """One statement in a transaction of its own (what `empty_every_table` retries)."""
    async with engine.begin() as conn:
        await conn.execute(text(sql))
