"""Live processes for the integrity invariants (issue 21): a `carnet serve` and a `carnet worker`.

Both run in their own processes against this test process's (migrated) database, so requests overlap across
processes and many PostgreSQL connections as in a deployment, while the worker dispatches and delivers the
outbox. Nothing runs in a test transaction: every table is emptied after each test.

`race` is what a test holds: an HTTP client to the live server that records every status it sees, a
connection for the SQL that checks the invariant afterwards, and the server's and worker's crash logs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from app.db import plain_dsn
from app.security import Role
from tests.auth import TEST_SECRET, bearer
from tests.emptying import empty_every_table
from tests.faults.harness import LiveServer, WorkerProcess

__all__ = ["ADMIN", "Race", "RoundStats", "gather"]

pytestmark = pytest.mark.committing

ADMIN = bearer(Role.ADMIN, subject="race@shop.example")


def _failures(log: Path) -> list[dict[str, Any]]:
    """A process's JSON log lines at level error (a crash: error type, SQLSTATE, frames) or saying the
    database was out of reach (a 503)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [entry for entry in map(_json, lines)
            if entry.get("level") == "error" or entry.get("event") == "database.unavailable"]


def _json(line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except ValueError:
        return {"level": "error", "event": "unparsed", "line": line[:200]}  # a traceback printed raw
    return entry if isinstance(entry, dict) else {}


@pytest.fixture(scope="session")
def live_api(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`carnet serve` (API only: the worker is its own process, as with DATABASE_URL in production)."""
    with LiveServer(
        tmp_path_factory.mktemp("race-api"), database_url, TEST_SECRET, RUN_WORKER_IN_API="false",
        # The machine is shared with other test runs: a request may queue for a pooled connection a while
        # rather than get the pool-exhaustion 503 (correct, but not what these tests are about).
        DATABASE_POOL_TIMEOUT="30", LOG_LEVEL="WARNING",
    ) as server:
        yield server


@pytest.fixture(scope="package")
def live_worker(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """`carnet worker` while this package's tests run (a test process runs them in one stretch): it never sees
    the data of other tests (their import jobs, their outbox)."""
    with WorkerProcess(tmp_path_factory.mktemp("race-worker"), database_url, WORKER_IDLE_SECONDS="0.2",
                       LOG_LEVEL="WARNING") as worker:
        yield worker


@dataclass
class RoundStats:
    """How often an invariant broke, over the rounds a test ran (printed, and quoted in the report)."""

    name: str
    rounds: int = 0
    broken: int = 0

    def record(self, ok: bool) -> None:
        self.rounds += 1
        self.broken += not ok

    def __str__(self) -> str:
        return f"{self.name}: invariant broken in {self.broken} of {self.rounds} rounds"


@dataclass
class Race:
    """A test's handle on the live system."""

    http: httpx.AsyncClient
    db: asyncpg.Connection
    api: LiveServer
    worker: WorkerProcess
    statuses: Counter[int] = field(default_factory=Counter)
    _crash_marks: tuple[int, int] = (0, 0)

    async def send(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                   **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, url, headers=headers or ADMIN, **kwargs)
        self.statuses[response.status_code] += 1
        return response

    async def ok(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        """A setup request that must succeed; its JSON body."""
        response = await self.send(method, url, **kwargs)
        assert response.status_code < 300, f"{method} {url}: {response.status_code} {response.text}"
        return response.json() if response.content else {}  # type: ignore[no-any-return]

    async def outbox_waiting(self, *, within: float) -> int:
        """Wait (up to `within` seconds) for the worker to dispatch every message and settle every delivery; how
        many are still waiting (0: drained)."""
        deadline = time.monotonic() + within
        while True:
            left = int(await self.db.fetchval(
                "SELECT (SELECT count(*) FROM outbox_message WHERE dispatched_at IS NULL)"
                " + (SELECT count(*) FROM delivery WHERE status <> 'delivered')"))
            if left == 0 or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.3)

    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def crashes(self) -> list[dict[str, Any]]:
        """What the server and the worker logged as failures since the test began."""
        return [*_failures(self.api.log)[self._crash_marks[0]:], *_failures(self.worker.log)[self._crash_marks[1]:]]

    def deadlocks(self) -> int:
        return sum(crash.get("sqlstate") == "40P01" for crash in self.crashes())

    def assert_no_server_error(self) -> None:
        assert self.server_errors() == 0, (self.statuses, self.crashes()[:3])
        assert self.crashes() == [], self.crashes()[:3]


async def gather(*calls: Awaitable[httpx.Response]) -> list[httpx.Response]:
    return list(await asyncio.gather(*calls))


@pytest_asyncio.fixture
async def helper(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection beside the app's: to hold the lock a race needs (tests/concurrency/held.py), then to read
    what was stored."""
    connection = await asyncpg.connect(plain_dsn(database_url))
    try:
        yield connection
    finally:
        await connection.close()


@pytest_asyncio.fixture
async def race(live_api: LiveServer, live_worker: WorkerProcess, database_url: str) -> AsyncIterator[Race]:
    # Idle connections are dropped before uvicorn's keep-alive timeout (5 s) closes them: reusing one the server
    # is closing at that moment is a ReadError on a busy machine, not an answer.
    limits = httpx.Limits(max_connections=120, max_keepalive_connections=120, keepalive_expiry=2)
    db = await asyncpg.connect(plain_dsn(database_url))
    marks = (len(_failures(live_api.log)), len(_failures(live_worker.log)))
    try:
        async with httpx.AsyncClient(base_url=live_api.base_url, limits=limits, timeout=60) as http:
            race = Race(http, db, live_api, live_worker, _crash_marks=marks)
            yield race
        for failure in race.crashes():  # shown with a failing test's output
            print("logged failure:", json.dumps(failure)[:600])
        assert live_api.alive() and live_worker.alive(), "the server or the worker died during the test"
    finally:
        try:
            await empty_every_table(db.execute)
        finally:
            await db.close()
