"""The access journal at run time: a buffer of read entries per process, written off the request path.

`JournalReads` (pure ASGI, inside RequestContext) opens an `app.access.Access` for each request and, once the
answer has gone out whole and below 400, hands the buffer one entry naming what it reached. `Journal.run`
chains the buffer every JOURNAL_FLUSH_SECONDS in one transaction (app.services.journal.append). A clean stop
flushes everything; a crash loses at most the entries of the last JOURNAL_FLUSH_SECONDS (docs/gdpr.md).
If the buffer reaches JOURNAL_BUFFER_MAX (the database is away), answers that would reveal personal data get
503 until it drains: an unrecorded access is what the journal exists to prevent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import access as access_context
from app.db import driver_connection
from app.logging import get_logger
from app.services import journal as journal_service
from app.services.journal import Entry
from app.settings import Settings

__all__ = ["Journal", "JournalReads", "JournalUpkeep"]

log = get_logger("carnet.journal")
FLUSH_BATCH = 5000
PENDING_EVERY_TICKS = 4          # with nothing buffered, acts journaled by writes are still chained every few ticks
STOP_FLUSH_SECONDS = 10.0


class Journal:
    """The read entries of this process, waiting to be chained."""

    def __init__(self, *, flush_seconds: float, max_buffer: int) -> None:
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._buffer: list[Entry] = []
        self._wake = asyncio.Event()

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.max_buffer

    def __len__(self) -> int:
        return len(self._buffer)

    def discard(self) -> None:
        """Drop what is buffered (tests: requests made without a lifespan, whose entries nobody flushes)."""
        self._buffer.clear()

    def add(self, entry: Entry) -> None:
        self._buffer.append(entry)
        if len(self._buffer) >= FLUSH_BATCH:
            self._wake.set()

    async def flush(self, sessions: async_sessionmaker[AsyncSession], *, pending: bool = True) -> int:
        """Chain what is buffered now (and the pending acts), a transaction per FLUSH_BATCH entries. Entries added
        meanwhile wait for the next tick (chained as they come, each would cost a transaction); on failure the
        unwritten ones go back in front, in order, for next time."""
        taken, self._buffer = self._buffer, []
        written = 0
        try:
            while written < len(taken) or pending:
                batch = taken[written:written + FLUSH_BATCH]
                async with sessions() as session, session.begin():
                    raw = await driver_connection(session)  # inside the transaction: the lock holds until commit
                    await journal_service.append(raw, batch)
                written += len(batch)
                pending = False
        except BaseException:
            self._buffer[:0] = taken[written:]
            raise
        return written

    async def run(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Flush every `flush_seconds` (sooner when a batch is full) until cancelled; then flush what is left."""
        ticks = 0
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_seconds)
                self._wake.clear()
                ticks += 1
                try:
                    await self.flush(sessions, pending=ticks % PENDING_EVERY_TICKS == 0)
                except Exception as exc:  # the database is away: keep the entries, try again next tick
                    log.warning("journal.flush_failed", error=type(exc).__name__, buffered=len(self._buffer))
        finally:
            await self._last_flush(sessions)

    async def _last_flush(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        deadline = asyncio.get_running_loop().time() + STOP_FLUSH_SECONDS
        while self._buffer and asyncio.get_running_loop().time() < deadline:
            try:
                await self.flush(sessions)
            except Exception as exc:
                log.warning("journal.flush_failed", error=type(exc).__name__, buffered=len(self._buffer))
                await asyncio.sleep(0.5)
        if self._buffer:
            log.error("journal.entries_lost", count=len(self._buffer))


_PUBLIC = "/v1/public/"


class JournalReads:
    """Opens each request's Access, and journals what a successful answer reached."""

    def __init__(self, app: ASGIApp, *, journal: Journal) -> None:
        self.app = app
        self.journal = journal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The public links are the person's own data, to the person (docs/gdpr.md): not journaled. An entry would
        # keep their IP address (client_addr), which no erasure rewrites.
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or scope["path"].startswith(_PUBLIC):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        client = scope.get("client")
        access = access_context.Access(state.get("request_id"), client[0] if client else None, scope,
                                       refused=self.journal.full)
        status, ended = 500, False

        async def watch(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
                await send(message)
            else:  # a body part: the answer ended once its last one was sent
                await send(message)
                ended = not message.get("more_body", False)

        token = access_context.begin(access)
        try:
            await self.app(scope, receive, watch)
        finally:
            access_context.end(token)
            # Once a status below 400 has gone out, the answer is journaled even if its body was then cut short (a
            # client gone, a stream that failed): what was sent reached someone (docs/gdpr.md).
            if status < 400 and (access.refs or access.action):
                self.journal.add(_entry(state.get("principal"), access, ended=ended))


def _entry(caller: Any, access: access_context.Access, *, ended: bool = True) -> Entry:
    refs = list(access.refs)
    rows, detail = access.rows, access.detail
    if not ended:
        detail = {**(detail or {}), "incomplete": True}
        rows = rows if rows is not None else access.streamed or None
    return Entry(
        kind=access.kind,
        action=access.action or "personal_data.read",
        subject=getattr(caller, "subject", "anonymous"),
        token_id=getattr(caller, "token_id", None),
        role=str(caller.role) if caller is not None else None,
        route=access_context.route(access),
        request_id=access.request_id,
        client_addr=access.client_addr,
        refs=refs,
        ref_count=rows if rows is not None else len(refs),
        detail=detail,
    )


ERASURE_HOLD = timedelta(hours=1)   # how long an erased contact id is remembered for reads still buffered


class JournalUpkeep:
    """Worker job: chain the acts journaled by writes (a worker-only deployment has no API process to do it),
    and apply JOURNAL_RETENTION_DAYS once an hour."""

    def __init__(self, *, every_seconds: float = 2.0, prune_every_seconds: float = 3600.0) -> None:
        self.every_seconds, self.prune_every_seconds = every_seconds, prune_every_seconds
        self._next = self._next_prune = 0.0

    async def __call__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> bool:
        now = time.monotonic()
        if not settings.journal_enabled or now < self._next:
            return False
        self._next = now + self.every_seconds
        async with sessions.begin() as session:
            raw = await driver_connection(session)
            await journal_service.append(raw, [])
        if now >= self._next_prune:
            async with sessions.begin() as session:
                raw = await driver_connection(session)
                removed = await journal_service.prune(raw, keep_days=settings.journal_retention_days,
                                                      erasure_hold=ERASURE_HOLD)
            self._next_prune = now + self.prune_every_seconds
            if removed:
                log.info("journal.pruned", removed=removed)
        return False
