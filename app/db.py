"""Engine, sessions and constraint helpers: the only place that knows how we talk to PostgreSQL."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn
from sqlmodel import SQLModel

__all__ = [
    "BareConnection",
    "ReadSession",
    "ReplicaSession",
    "WriteSession",
    "async_url",
    "bare_connection",
    "connection_failure",
    "constraint_name",
    "describe_url",
    "driver_connection",
    "get_read_sessionmaker",
    "get_replica_sessionmaker",
    "get_sessionmaker",
    "is_unique_violation",
    "make_engine",
    "make_read_sessionmaker",
    "make_sessionmaker",
    "milliseconds",
    "plain_dsn",
    "pooled_connection",
    "server_settings",
]

# Stable constraint names that code may match on (never the message text).
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata: MetaData = SQLModel.metadata


def async_url(url: str) -> str:
    """Accept the usual `postgres://` / `postgresql://` forms and select the asyncpg driver."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def plain_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg.connect takes (no SQLAlchemy driver suffix)."""
    return async_url(url).replace("postgresql+asyncpg://", "postgresql://", 1)


# Background work (the worker's lanes, dispatcher and heartbeat share 4 connections) waits its turn for a
# connection: no client waits on it for a quick 503, and a 5 s timeout crashed `carnet worker` in a Mailchimp drain
# on a loaded machine (six lanes planning and completing 1,500-order batches at once; docs/performance.md).
BACKGROUND_POOL_TIMEOUT = 120.0


def make_engine(
    url: str, *, pool_size: int = 10, pool_timeout: float = 5.0, statement_timeout: float | None = None,
    settings: Mapping[str, str] | None = None,
) -> AsyncEngine:
    """`statement_timeout`: the seconds each statement may run by default (app.timeouts). The app always gives
    it; None (the server's default) is for tests and benchmarks. `settings`: more of the connections' defaults."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=0,                  # overflow connections are opened and closed per burst: costly churn
        pool_timeout=pool_timeout,       # pool exhausted → error quickly, rendered as 503
        pool_pre_ping=False,             # a dead connection is dropped on error instead of pinging every checkout
        connect_args={"timeout": 5, "server_settings": {
            **server_settings(statement_timeout=statement_timeout), **(settings or {})}},
    )


def server_settings(*, statement_timeout: float | None) -> dict[str, str]:
    """What our connections tell PostgreSQL at connect: in the startup packet, so no round trip per request.

    Behind PgBouncer (transaction pooling), list `statement_timeout` in its `ignore_startup_parameters` and set
    the default on the role instead (docs/security.md, "Class 3"); the costly-read pool's other settings
    (app.timeouts.COSTLY_SETTINGS) likewise.
    """
    settings = {"application_name": "carnet"}
    if statement_timeout is not None:
        settings["statement_timeout"] = milliseconds(statement_timeout)
    return settings


def milliseconds(seconds: float) -> str:
    """A duration as PostgreSQL's integer milliseconds (at least 1: 0 would mean no limit)."""
    return str(max(1, round(seconds * 1000)))


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def make_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions in autocommit for reads: no BEGIN/ROLLBACK round trips around them (same pool).

    Each statement still sees one consistent snapshot; a read session never writes.
    """
    return make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))


async def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    # async: FastAPI runs a plain `def` dependency in the thread pool, a costly hop on every request
    return request.app.state.sessionmaker  # type: ignore[no-any-return]  # built in the lifespan; tests override


async def _write_session(
    makers: Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)],
) -> AsyncIterator[AsyncSession]:
    async with makers() as session, session.begin():
        yield session  # clean exit commits; an exception rolls back


async def get_read_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    return request.app.state.read_sessionmaker  # type: ignore[no-any-return]  # built in the lifespan; tests override


async def _read_session(
    makers: Annotated[async_sessionmaker[AsyncSession], Depends(get_read_sessionmaker)],
) -> AsyncIterator[AsyncSession]:
    async with makers() as session:
        yield session  # never commits


async def get_replica_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    """Exports and segment reads: the replica when DATABASE_REPLICA_URL is set, else the primary's readers."""
    return request.app.state.replica_sessionmaker  # type: ignore[no-any-return]  # built in the lifespan


async def _replica_session(
    makers: Annotated[async_sessionmaker[AsyncSession], Depends(get_replica_sessionmaker)],
) -> AsyncIterator[AsyncSession]:
    async with makers() as session:
        yield session  # never commits


@asynccontextmanager
async def bare_connection(request: Request, *, replica: bool = False) -> AsyncIterator[asyncpg.Connection]:
    """The pooled asyncpg connection itself, for single statements on hot paths.

    No session and no transaction: SQLAlchemy's BEGIN/ROLLBACK round trips and statement building cost
    ~1.0 ms a read against ~0.3 ms this way (bench/, docs/performance.md). Hold it for one statement only
    when the same request may also open a session: two held connections per request can starve the pool.
    """
    makers = request.app.state.replica_sessionmaker if replica else request.app.state.sessionmaker
    async with pooled_connection(makers) as connection:
        yield connection


@asynccontextmanager
async def pooled_connection(makers: async_sessionmaker[AsyncSession]) -> AsyncIterator[asyncpg.Connection]:
    """`bare_connection` from these sessions' pool."""
    bind = makers.kw["bind"]
    if isinstance(bind, AsyncEngine):
        pooled = await _checkout(bind)
        raw = pooled.driver_connection
        try:
            yield raw
        except Exception as exc:
            if not _disconnected(exc, raw):
                raise
            # SQLAlchemy never saw this error: do what it does on a disconnect it sees (outage drill,
            # tests/faults): drop this connection, and recycle at their next checkout all those opened
            # before it (they died with the same server). Then report it as SQLAlchemy would (→ 503).
            bind.sync_engine.pool._invalidate(pooled, exc)
            raise DBAPIError(None, None, exc, connection_invalidated=True) from exc
        finally:
            # A transaction opened here (an export, a costly read: app.timeouts) that could not be ended, e.g.
            # cancelled mid-statement: SQLAlchemy's reset on return would not end it. Never reuse it.
            if not raw.is_closed() and raw.is_in_transaction():
                await greenlet_spawn(pooled.invalidate)
                await greenlet_spawn(pooled.close)  # back to the pool, closed for good
            else:
                # Back to the pool with nothing to await (no SQLAlchemy transaction to roll back, a fixed-size pool
                # always has room), so without greenlet_spawn: a new greenlet costs ~20 µs (its own frame stack,
                # an mmap and a munmap: strace, docs/performance.md).
                pooled.close()
    else:  # a sessionmaker bound to one connection (the tests' per-test transaction)
        yield (await bind.get_raw_connection()).driver_connection


async def driver_connection(session: AsyncSession) -> asyncpg.Connection:
    """The session's asyncpg connection, inside the session's transaction (COPY needs the driver itself).

    SQLAlchemy's asyncpg dialect sends BEGIN lazily, with the first statement SQLAlchemy executes: statements
    sent to the driver before that run in autocommit, each committed at once, with no lock held past it and no
    rollback. So the transaction is begun here first (nothing is sent when it already is).
    """
    connection = await session.connection()
    pooled = await connection.get_raw_connection()
    raw: asyncpg.Connection = pooled.driver_connection
    if not raw.is_in_transaction() and not pooled.dbapi_connection.autocommit:  # type: ignore[union-attr]
        await connection.exec_driver_sql("SELECT 1")  # the dialect begins the transaction before it
    return raw


async def _checkout(engine: AsyncEngine) -> PoolProxiedConnection:
    """A connection straight from the engine's pool, without the engine-level Connection that `engine.connect()`
    wraps around it (its construction, events and close were ~14% of an upsert's server CPU: py-spy,
    docs/performance.md). A driver error while connecting is wrapped as that constructor wraps it (DBAPIError →
    503), the pool's own errors (exhausted: TimeoutError) pass as they are."""
    sync = engine.sync_engine
    try:
        # In a greenlet: taking a connection may open one (a new one, or one to recycle after an outage) or wait.
        return await greenlet_spawn(sync.pool.connect)
    except sync.dialect.loaded_dbapi.Error as exc:
        Connection._handle_dbapi_exception_noconnection(exc, sync.dialect, sync)
        raise


def _disconnected(exc: Exception, raw: asyncpg.Connection) -> bool:
    """The asyncpg dialect's own test (the connection is closed), or the server going away or shutting down.

    A statement stopped by its timeout is "operator intervention" too (SQLSTATE 57014), on a sound connection.
    """
    if isinstance(exc, asyncpg.QueryCanceledError):
        return raw.is_closed()
    return raw.is_closed() or isinstance(
        exc, OSError | asyncpg.PostgresConnectionError | asyncpg.exceptions.OperatorInterventionError
    )


async def _bare_connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    async with bare_connection(request) as connection:
        yield connection


# scope="function": the commit happens before the response is sent (STYLE.md fact 1).
WriteSession = Annotated[AsyncSession, Depends(_write_session, scope="function")]
ReadSession = Annotated[AsyncSession, Depends(_read_session, scope="function")]
ReplicaSession = Annotated[AsyncSession, Depends(_replica_session, scope="function")]
BareConnection = Annotated[asyncpg.Connection, Depends(_bare_connection, scope="function")]


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or getattr(getattr(exc.orig, "__cause__", None), "sqlstate", None)


def is_unique_violation(exc: IntegrityError) -> bool:
    return _sqlstate(exc) == "23505"


def constraint_name(exc: DBAPIError) -> str | None:
    """asyncpg's constraint name for an integrity error (a naming-convention name)."""
    cause = getattr(exc.orig, "__cause__", None)
    return getattr(cause, "constraint_name", None)


# The server's refusals of a connection, in its own words ('password authentication failed for user "carnet"',
# 'database "x" does not exist', 'the database system is starting up', 'too many clients already').
_REFUSALS = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError,
             asyncpg.InvalidCatalogNameError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


def connection_failure(exc: BaseException) -> str | None:
    """Why no connection could be had, in one line, when `exc` (or what it wraps) says so; None for anything else.

    Only the errors of connecting count: a failed statement, or a file that cannot be written, is not this."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _REFUSALS):
            return str(current)
        if isinstance(current, socket.gaierror):  # no such host
            return current.strerror or str(current)
        if isinstance(current, ConnectionError | TimeoutError):  # refused, reset, timed out
            return os.strerror(current.errno) if current.errno else str(current) or "timed out"
        if isinstance(current, OSError) and "Connect call failed" in str(current):  # asyncio, several addresses
            return str(current)
        current = current.__cause__ or current.__context__
    return None


def describe_url(url: str) -> str:
    """`host:port/database` of a database URL, for messages: never the user's password."""
    parts = make_url(async_url(url))
    host = parts.host or parts.query.get("host") or "localhost"
    return f"{host}:{parts.port or 5432}/{parts.database or ''}"
