"""Storage limitation as worker jobs: each sweep is one set-based statement that clears what has outlived its
retention period, a batch at a time (GDPR art. 5(1)(e))."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from sqlalchemy import TextClause
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.settings import Settings

__all__ = ["Sweep"]


class Sweep:
    """A worker job: `statement` clears at most `batch` rows (`:limit`); it runs at most every `every_seconds`,
    and again at once while a round clears a full batch."""

    statement: ClassVar[TextClause]

    def __init__(self, *, every_seconds: float = 3600.0, batch: int = 5000) -> None:
        self.every_seconds, self.batch = every_seconds, batch
        self._next_sweep = 0.0

    def params(self, settings: Settings) -> dict[str, Any]:
        return {}

    async def __call__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> bool:
        """True while there is more to clear now (the worker calls again at once); False: idle until next time."""
        if time.monotonic() < self._next_sweep:
            return False
        async with sessions.begin() as session:
            cleared = (await session.execute(self.statement, {**self.params(settings), "limit": self.batch})).rowcount
        if cleared < self.batch:
            self._next_sweep = time.monotonic() + self.every_seconds
        return cleared == self.batch
