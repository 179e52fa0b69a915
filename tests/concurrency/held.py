"""Making a race deterministic: wait until requests queue for locks a helper connection holds.

The helper holds a lock a request needs after it has read what decides its write (a table lock on
`outbox_message`, a row lock), so the request stops there, still open; the test then sends the racing request and
waits until it too waits for a lock (or has finished), and only then lets go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import asyncpg

__all__ = ["race_past_held_table", "until_waiting", "waiting"]


async def waiting(db: asyncpg.Connection) -> int:
    """How many other backends of this database wait for a lock (the activity snapshot is cleared first: inside
    the helper's transaction it would otherwise be read once and kept)."""
    await db.execute("SELECT pg_stat_clear_snapshot()")
    return int(await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        " AND pid <> pg_backend_pid()"))


async def until_waiting(db: asyncpg.Connection, count: int, *, or_done: asyncio.Task[Any] | None = None,
                        within: float = 20) -> None:
    """Wait until `count` backends wait for a lock (or `or_done` finished)."""
    deadline = time.monotonic() + within
    while await waiting(db) < count and not (or_done is not None and or_done.done()):
        assert time.monotonic() < deadline, "the requests never reached the lock"
        await asyncio.sleep(0.02)


async def race_past_held_table(db: asyncpg.Connection, table: str, first: Awaitable[Any], second: Awaitable[Any]
                               ) -> tuple[Any, Any]:
    """Hold `table` (EXCLUSIVE) so that `first` stops at its first write there; send `second` once `first` waits,
    wait until `second` waits too (for that table or a lock `first` holds) or is done, then let both go on: their
    answers. `db` is left outside any transaction, for the test's checks."""
    holding = db.transaction()
    await holding.start()
    try:
        await db.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        one = asyncio.ensure_future(first)
        await until_waiting(db, 1)
        other = asyncio.ensure_future(second)
        await until_waiting(db, 2, or_done=other)
    finally:
        await holding.rollback()
    return await one, await other
