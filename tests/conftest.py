"""Test database (one per xdist worker, built by `alembic upgrade head`), per-test rollback, app and client."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import (
    async_url,
    get_read_sessionmaker,
    get_replica_sessionmaker,
    get_sessionmaker,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    metadata,
)
from app.embedded import EmbeddedPostgres
from app.main import create_app
from app.migrations import upgrade
from app.settings import Settings
from tests.auth import TEST_SECRET
from tests.emptying import empty_every_table, execute_alone

TABLES = tuple(f'"{name}"' for name in sorted(metadata.tables))  # quoted: "order" is a keyword


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """TEST_DATABASE_URL when set (CI: the machine's PostgreSQL), an embedded server otherwise."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield async_url(url)
        return
    with tempfile.TemporaryDirectory(prefix="carnet-test-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp))
        yield embedded.start()
        embedded.stop()


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def _drop(url: str, name: str) -> None:
    admin = make_url(url).set(drivername="postgresql", database="postgres")
    host = admin.query.get("host")
    conn = await asyncpg.connect(admin.render_as_string(hide_password=False).split("?")[0], timeout=10,
                                 **({"host": host} if isinstance(host, str) else {}))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _recreate(url: str, name: str) -> None:
    admin = make_url(url).set(drivername="postgresql", database="postgres")
    dsn = admin.render_as_string(hide_password=False)
    host = admin.query.get("host")
    kwargs = {"host": host} if isinstance(host, str) else {}
    try:
        conn = await asyncpg.connect(dsn.split("?")[0], timeout=10, **kwargs)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.exit(f"cannot reach the test PostgreSQL ({type(exc).__name__}): {exc}", returncode=3)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url(server_url: str, worker_id: str) -> Iterator[str]:
    """A fresh database for this xdist worker, migrated to head (migrations are exercised, never create_all).

    Named after the process too, so two test runs on one machine never drop each other's database.
    """
    with migrated_database(server_url, f"carnet_test_{worker_id}_{os.getpid()}") as url:
        yield url


@contextlib.contextmanager
def migrated_database(server_url: str, name: str) -> Iterator[str]:
    """A fresh database `name` migrated to head, dropped afterwards (also for modules that commit rows of their own)."""
    asyncio.run(_recreate(server_url, name))
    url = _with_database(server_url, name)
    upgrade(url)
    try:
        yield url
    finally:
        asyncio.run(_drop(server_url, name))


@pytest.fixture
def fresh_database(server_url: str, worker_id: str) -> Iterator[str]:
    """An empty database of the test's own, not even migrated (what a new deployment points Carnet at)."""
    name = f"carnet_fresh_{worker_id}_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    asyncio.run(_recreate(server_url, name))
    yield _with_database(server_url, name)
    asyncio.run(_drop(server_url, name))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url, pool_size=5)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def sessions(engine: AsyncEngine) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Every test runs in one outer transaction, rolled back; the app's commits become savepoints."""
    async with engine.connect() as connection:
        outer = await connection.begin()
        yield async_sessionmaker(
            bind=connection, class_=AsyncSession, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        await outer.rollback()


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=database_url,
        jwt_secret=TEST_SECRET,  # type: ignore[arg-type]
        data_dir=tmp_path_factory.mktemp("data"),
        max_body_bytes=1024 * 1024,
        log_json=True,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest_asyncio.fixture(loop_scope="session")
async def client(app: FastAPI, sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[httpx.AsyncClient]:
    app.dependency_overrides[get_sessionmaker] = lambda: sessions
    app.dependency_overrides[get_read_sessionmaker] = lambda: sessions
    app.dependency_overrides[get_replica_sessionmaker] = lambda: sessions
    app.state.sessionmaker = sessions
    app.state.replica_sessionmaker = sessions
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http
    app.dependency_overrides.clear()
    _forget_journal(app)


def _forget_journal(app: FastAPI) -> None:
    """No lifespan runs under ASGITransport, so nothing flushes the journal's buffer: a test that wants its
    entries flushes them (tests/routers/test_journal.py); the others' must not pile up across the session."""
    if app.state.journal is not None:
        app.state.journal.discard()


@pytest_asyncio.fixture(loop_scope="session")
async def committing_client(app: FastAPI, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    """Real, separate transactions (races); the tables are emptied afterwards."""
    makers = make_sessionmaker(engine)
    readers = make_read_sessionmaker(engine)  # the production read path: autocommit sessions
    app.dependency_overrides[get_sessionmaker] = lambda: makers
    app.dependency_overrides[get_read_sessionmaker] = lambda: readers
    app.dependency_overrides[get_replica_sessionmaker] = lambda: readers
    app.state.sessionmaker = makers
    app.state.replica_sessionmaker = readers
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http
    app.dependency_overrides.clear()
    _forget_journal(app)
    await empty_every_table(functools.partial(execute_alone, engine))


@pytest.fixture(scope="session")
def table_names() -> list[str]:
    return sorted(metadata.tables)


def _fuzz_requests(config: pytest.Config) -> tuple[int, int]:
    """(requests sent, fuzz tests reported) by tests/test_fuzz.py, summed over the xdist workers."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    total = tests = 0
    for report in (reporter.stats.get("passed", []) + reporter.stats.get("skipped", [])) if reporter else []:
        if getattr(report, "when", None) == "call" or report.skipped:
            if "test_fuzz.py::" not in report.nodeid:
                continue
            tests += 1
            total += sum(int(v) for k, v in getattr(report, "user_properties", []) if k == "fuzz_requests")
    return total, tests


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    total, tests = _fuzz_requests(config)
    if tests:
        terminalreporter.write_line(f"schemathesis: {total} requests over {tests} fuzz tests")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole fuzz module ran but sent fewer requests than promised: fail the run (visible budget)."""
    from tests.test_fuzz import FUZZ_TESTS, MIN_TOTAL_REQUESTS

    total, tests = _fuzz_requests(session.config)
    if tests == FUZZ_TESTS and total < MIN_TOTAL_REQUESTS and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nschemathesis: only {total} requests, fewer than {MIN_TOTAL_REQUESTS}")
