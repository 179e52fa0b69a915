"""Statement timeouts by kind of work: no statement holds a connection, or a core, longer than its kind allows.

    kind         setting (seconds)                       how it is applied
    interactive  STATEMENT_TIMEOUT_INTERACTIVE_SECONDS   the API's connections, at connect (app.db.server_settings):
                                                         every request's statements, the fast paths' included
    costly       STATEMENT_TIMEOUT_COSTLY_SECONDS        counts: the costly-read pool's connections, at connect
                                                         (`costly_connection`); previews, segment members,
                                                         `?segment=`, duplicates: `within` (SET LOCAL in a read-only
                                                         transaction around the read); app.security.costly caps how
                                                         many run at once
    export       STATEMENT_TIMEOUT_EXPORT_SECONDS        the export's transaction (its COPY is one statement: the
                                                         whole download), `carnet export`
    worker       STATEMENT_TIMEOUT_WORKER_SECONDS        the worker's and the CLI's connections, the API's background
                                                         jobs; the API's bulk writes by SET LOCAL (BulkWriteSession)

A statement stopped by its timeout (SQLSTATE 57014) is answered 503 `statement-timeout` with Retry-After
(docs/security.md, "Class 3").
"""

from __future__ import annotations

import math
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import await_only

from app.db import WriteSession, bare_connection, make_engine, milliseconds, pooled_connection
from app.errors import ServiceUnavailable
from app.logging import get_logger
from app.settings import Settings

__all__ = [
    "COSTLY_SETTINGS",
    "ONE_CORE",
    "BulkWriteSession",
    "StatementTimeout",
    "StatementTimeouts",
    "costly_connection",
    "is_statement_timeout",
    "make_costly_engine",
    "session_within",
    "set_local",
    "verify_costly_settings",
    "within",
]

log = get_logger("carnet.timeouts")

_QUERY_CANCELED = "57014"  # statement_timeout, or a pg_cancel_backend(): the same SQLSTATE


@dataclass(frozen=True, slots=True)
class StatementTimeouts:
    """The four budgets in seconds, from the settings (app.state.timeouts)."""

    interactive: float
    costly: float
    export: float
    worker: float

    @classmethod
    def from_settings(cls, settings: Settings) -> StatementTimeouts:
        return cls(settings.statement_timeout_interactive_seconds, settings.statement_timeout_costly_seconds,
                   settings.statement_timeout_export_seconds, settings.statement_timeout_worker_seconds)


class StatementTimeout(ServiceUnavailable):
    """503, not 4xx: the same request completes on a quieter database; not 500: nothing is broken (docs/security.md)."""

    slug, title = "statement-timeout", "The database stopped this request's query: it ran past its time limit"

    def __init__(self, detail: str | None = None, /, *, seconds: float | None = None) -> None:
        super().__init__(detail, retry_after=max(1, math.ceil(seconds)) if seconds else 2)


def set_local(seconds: float) -> str:
    """The statement that gives the rest of the current transaction its own timeout (a number: no injection)."""
    return f"SET LOCAL statement_timeout = {milliseconds(seconds)}"


# A costly read runs on one core. With parallel workers (2 a query by default, plus the leader) each of the
# COSTLY_READS_PER_PROCESS reads took up to 3 cores: 4 worst-case previews kept 11 backends busy on 2 cores, and
# contact reads waited seconds behind them (bench/bench_costly.py). The cap must bound the CPU, not just statements.
ONE_CORE = "SET LOCAL max_parallel_workers_per_gather = 0"


def is_statement_timeout(exc: BaseException) -> bool:
    """A statement stopped by the server (raw asyncpg on a bare connection, or wrapped by SQLAlchemy)."""
    if isinstance(exc, DBAPIError):
        cause = getattr(exc.orig, "__cause__", None)
        return _QUERY_CANCELED in (getattr(exc.orig, "sqlstate", None), getattr(cause, "sqlstate", None))
    return isinstance(exc, asyncpg.QueryCanceledError)


@asynccontextmanager
async def within(connection: asyncpg.Connection, seconds: float, *, kind: str) -> AsyncIterator[None]:
    """The block's reads in one read-only transaction under `seconds` instead of the connection's default, on one
    core (ONE_CORE).

    SET LOCAL ends with the transaction, which is always rolled back (reads only): the pooled connection goes back
    with its own defaults. BEGIN and the settings travel in one round trip. In a caller's transaction (the CLI, the
    tests) it is a savepoint, rolled back as well. A statement cut by the timeout becomes StatementTimeout naming
    the `kind` and its limit.
    """
    nested = connection.transaction() if connection.is_in_transaction() else None
    if nested is not None:
        await nested.start()
        await connection.execute(f"{set_local(seconds)}; {ONE_CORE}")
    else:
        await connection.execute(f"BEGIN READ ONLY; {set_local(seconds)}; {ONE_CORE}")
    try:
        async with _stopped_by(seconds, kind=kind):
            yield
    finally:
        await (nested.rollback() if nested is not None else connection.execute("ROLLBACK"))


# What `within` sets around each read, given instead to the costly-read pool's connections when they open (in the
# startup packet, with the costly statement_timeout): every statement on them runs read-only, on one core.
COSTLY_SETTINGS = {"default_transaction_read_only": "on", "max_parallel_workers_per_gather": "0"}


def make_costly_engine(url: str, timeouts: StatementTimeouts, *, pool_size: int, pool_timeout: float) -> AsyncEngine:
    """The pool of costly reads' connections: `pool_size` is the process's costly-read slots (each slot holds at
    most one connection, so none ever waits here, and the API's own pool never serves these reads)."""
    engine = make_engine(url, pool_size=pool_size, pool_timeout=pool_timeout, statement_timeout=timeouts.costly,
                         settings=COSTLY_SETTINGS)
    verify_costly_settings(engine, timeouts)
    return engine


def verify_costly_settings(engine: AsyncEngine, timeouts: StatementTimeouts) -> None:
    """Each new connection of `engine` is checked once (one round trip when it opens, none per read). One that
    opened without the costly settings, e.g. through a pooler that drops startup parameters (PgBouncer in
    transaction mode, with them in `ignore_startup_parameters`), is marked: `costly_connection` then guards its
    reads with `within` (SET LOCAL, which works through a transaction pooler), never runs them unprotected."""
    expected = {**COSTLY_SETTINGS, "statement_timeout": milliseconds(timeouts.costly)}

    def check(dbapi_connection: Any, _record: Any) -> None:
        raw: asyncpg.Connection = dbapi_connection.driver_connection
        rows = await_only(raw.fetch("SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                                    list(expected)))
        got = {row["name"]: row["setting"] for row in rows}
        if got != expected:
            log.warning("costly_reads.settings_dropped", expected=expected, got=got)
            _unprotected.add(raw)

    event.listen(engine.sync_engine, "connect", check)


# Costly-read connections that opened without COSTLY_SETTINGS (verify_costly_settings): `within` guards their reads.
_unprotected: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()


@asynccontextmanager
async def costly_connection(request: Request, *, kind: str) -> AsyncIterator[asyncpg.Connection]:
    """A bare connection for one costly read: read-only, on one core, under the costly timeout (the caller holds a
    costly-read slot: app.security.costly).

    From the costly-read pool (app.state.costly_sessionmaker, on the replica when there is one), whose connections
    open that way: each statement is its own single round trip. `within` costs two more (BEGIN with the settings,
    ROLLBACK), which made a 5-13 ms events count 1.5-1.7x the hand-written SQL under load (docs/performance.md,
    "Events"). Without that pool (the tests' shared transaction), or on a connection that opened without its
    settings (verify_costly_settings), `within`.
    """
    seconds: float = request.app.state.timeouts.costly
    makers = request.app.state.costly_sessionmaker
    opened = bare_connection(request, replica=True) if makers is None else pooled_connection(makers)
    async with opened as connection:
        guarded = makers is None or connection in _unprotected
        async with within(connection, seconds, kind=kind) if guarded else _stopped_by(seconds, kind=kind):
            yield connection


@asynccontextmanager
async def _stopped_by(seconds: float, *, kind: str) -> AsyncIterator[None]:
    """A statement cut by the timeout, as StatementTimeout naming the `kind` and its limit."""
    try:
        yield
    except Exception as exc:
        if is_statement_timeout(exc):
            raise StatementTimeout(f"{kind} may run {seconds:g} s; this one took longer: narrow it, or retry later",
                                   seconds=seconds) from None
        raise


@asynccontextmanager
async def session_within(session: AsyncSession, seconds: float, *, kind: str) -> AsyncIterator[None]:
    """`within` for a session's statements: read sessions run in autocommit, so the transaction is opened on the
    session's asyncpg connection itself. A connection that could not be brought back out of it is discarded."""
    connection = await session.connection()
    raw: asyncpg.Connection = (await connection.get_raw_connection()).driver_connection
    outside = not raw.is_in_transaction()
    try:
        async with within(raw, seconds, kind=kind):
            yield
    finally:
        if outside and raw.is_in_transaction():  # e.g. cancelled mid-statement: never hand it to the next request
            await connection.invalidate()


async def _bulk_write_session(request: Request, session: WriteSession) -> AsyncSession:
    await session.execute(text(set_local(request.app.state.timeouts.worker)))
    return session


# A write transaction that may touch every contact (a tag taken off all, a resync): the worker's
# budget, since that is the kind of work it is, started by a request. The same session as WriteSession's.
BulkWriteSession = Annotated[AsyncSession, Depends(_bulk_write_session)]
