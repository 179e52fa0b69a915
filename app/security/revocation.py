"""The revoked-token list every API process keeps current through PostgreSQL LISTEN/NOTIFY.

Revoking commits a row and a NOTIFY; each process's listener adds the id within milliseconds. While a
process is not listening (startup, lost connection), `is_revoked` answers None and the caller asks the
database on each request instead: revocation is never skipped, only made slower.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.logging import get_logger

__all__ = ["REVOCATION_CHANNEL", "RevocationList", "revoked_in_database"]

REVOCATION_CHANNEL = "carnet_token_revoked"
log = get_logger("carnet.revocation")


async def revoked_in_database(session: AsyncSession, jti: str) -> bool:
    revoked = await session.scalar(
        text("SELECT revoked_at IS NOT NULL FROM access_token WHERE jti = :jti"), {"jti": jti}
    )
    return bool(revoked)


class RevocationList:
    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._listening = False
        self._task: asyncio.Task[None] | None = None

    def is_revoked(self, jti: str) -> bool | None:
        """True/False while listening; None when unsure (ask the database)."""
        if jti in self._ids:
            return True
        return False if self._listening else None

    def add(self, jti: str) -> None:
        self._ids.add(jti)

    def start(self, dsn: str, *, server_settings: dict[str, str] | None = None) -> None:
        self._task = asyncio.create_task(self._run(dsn, server_settings), name="revocation-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._listening = False

    async def _run(self, dsn: str, server_settings: dict[str, str] | None) -> None:
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(dsn, timeout=5, server_settings=server_settings)
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                await connection.add_listener(REVOCATION_CHANNEL, self._on_notify)  # listen first: no gap
                rows = await connection.fetch(
                    "SELECT jti FROM access_token WHERE revoked_at IS NOT NULL AND expires_at > now()"
                )
                self._ids.update(r["jti"] for r in rows)
                self._listening = True
                log.info("revocation.listening", revoked=len(self._ids))
                while not lost.is_set():  # a dead socket is noticed by the periodic ping
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=5)
                    if not lost.is_set():
                        await connection.fetchval("SELECT 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("revocation.listener_lost", error=type(exc).__name__)
            finally:
                self._listening = False
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await asyncio.sleep(1)

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self._ids.add(payload)
