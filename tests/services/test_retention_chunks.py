"""A retention run commits every RETENTION_CHUNK people, each chunk its own transaction (docs/gdpr.md).

One transaction held ERASURE_LOCK and a row lock on every qualifying prospect for the whole run (20,000 prospects:
24 s; a first run over 150,000, minutes): every import batch running meanwhile waited, three times, and the import
failed; every write to one of those prospects waited too. Now imports and API writes go on between chunks.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import get_sessionmaker, make_sessionmaker, plain_dsn
from app.security import Principal, Role
from app.services import gdpr
from app.services.imports import runner
from app.settings import Settings
from app.timeouts import set_local
from tests.concurrency.held import until_waiting
from tests.csv_samples import build_csv
from tests.factories import ADMIN
from tests.routers.test_journal import seed_prospects
from tests.services.test_import_batch import _upload

CHUNK = 3
ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A helper connection of the test's own: holds a row, watches for requests waiting on a lock."""
    connection = await asyncpg.connect(plain_dsn(database_url))
    yield connection
    await connection.close()


async def _stale(sessions: async_sessionmaker[AsyncSession], count: int) -> list[dict[str, Any]]:
    """`count` prospects inactive for 1200 days (RETENTION_PROSPECT_DAYS: 1095), committed; by id."""
    prefix = f"rc-{uuid.uuid4().hex[:8]}"
    async with sessions.begin() as session:
        await seed_prospects(session, prefix, count, age_days=1200)
    async with sessions() as session:
        rows = await session.execute(text("SELECT id, email FROM contact WHERE email LIKE :p ORDER BY id"),
                                     {"p": f"{prefix}-%"})
        return [{"id": str(r.id), "email": r.email} for r in rows]


async def _runs(sessions: async_sessionmaker[AsyncSession]) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.execute(text(  # chained, or still pending (no flusher runs under ASGITransport)
            "SELECT detail, ref_count FROM (SELECT action, detail, ref_count FROM journal_entry UNION ALL "
            "SELECT action, detail, ref_count FROM journal_pending) e WHERE action = 'retention.run' "
            "ORDER BY (detail->>'part')::int"))
        return [{"ref_count": r.ref_count, **r.detail} for r in rows]


async def _exists(sessions: async_sessionmaker[AsyncSession], contact_id: str) -> bool:
    async with sessions() as session:
        return bool(await session.scalar(text("SELECT count(*) FROM contact WHERE id = :id"),
                                         {"id": uuid.UUID(contact_id)}))


async def test_a_run_over_several_chunks_erases_all_and_journals_each_chunk(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gdpr, "RETENTION_CHUNK", CHUNK)
    people = await _stale(sessions, 2 * CHUNK + 1)
    run = await client.post("/v1/retention/run", json={"dry_run": False}, headers=ADMIN)
    assert run.status_code == 200, run.text
    answer = run.json()
    assert answer["erased"] == len(people) and answer["contact_ids"] == [p["id"] for p in people]
    assert answer["contact_ids_truncated"] is False
    assert not any([await _exists(sessions, p["id"]) for p in people])
    entries = await _runs(sessions)
    assert [(e["part"], e["ref_count"], e["erased"], e["last"]) for e in entries] == [
        (1, 3, 3, False), (2, 3, 6, False), (3, 1, 7, True)]
    assert len({e["run"] for e in entries}) == 1 and not any(e["dry_run"] for e in entries)


@pytest.mark.committing
async def test_writes_go_on_between_chunks_and_a_later_chunk_is_decided_when_reached(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run is stopped inside its second chunk (a helper holds one of its rows): the first chunk is already
    erased, and an upsert of a prospect of the third chunk goes through at once (it waited for the whole run, its
    row locked from the start); it is active then, so the run keeps them."""
    monkeypatch.setattr(gdpr, "RETENTION_CHUNK", CHUNK)
    client, sessions = committing_client, make_sessionmaker(engine)
    people = await _stale(sessions, 2 * CHUNK + 1)
    first, second, third = people[:CHUNK], people[CHUNK:2 * CHUNK], people[2 * CHUNK:]
    async with sessions.begin() as session:  # a row the second chunk's erasure deletes
        await session.execute(text(
            "INSERT INTO contact_history (contact_id, field, old_value, new_value, subject, via, at) "
            "VALUES (:id, 'first_name', NULL, '\"Old\"', 'test', 'api', now() - interval '1200 days')"),
            {"id": uuid.UUID(second[0]["id"])})
    holding = db.transaction()
    await holding.start()
    try:
        await db.execute("SELECT 1 FROM contact_history WHERE contact_id = $1 FOR UPDATE", uuid.UUID(second[0]["id"]))
        running = asyncio.ensure_future(client.post("/v1/retention/run", json={"dry_run": False}, headers=ADMIN))
        await until_waiting(db, 1, or_done=running)
        assert not running.done()
        assert not any([await _exists(sessions, p["id"]) for p in first])  # committed already
        upsert = client.post("/v1/contacts/upsert", json={"email": third[0]["email"], "first_name": "Back"},
                             headers=ADMIN)
        answer = await asyncio.wait_for(upsert, timeout=5)
        assert answer.status_code == 200, answer.text
    finally:
        await holding.rollback()
    run = await running
    assert run.status_code == 200, run.text
    assert run.json()["contact_ids"] == [p["id"] for p in first + second]
    assert await _exists(sessions, third[0]["id"])
    entries = await _runs(sessions)
    assert [(e["part"], e["ref_count"], e["last"]) for e in entries] == [(1, 3, False), (2, 3, False), (3, 0, True)]


class _Pausing:
    """The app's sessionmaker, whose second transaction waits for `go`: the run stopped between two chunks."""

    def __init__(self, makers: async_sessionmaker[AsyncSession]) -> None:
        self.makers, self.begun = makers, 0
        self.paused, self.go = asyncio.Event(), asyncio.Event()

    def __call__(self, **kwargs: Any) -> AsyncSession:
        return self.makers(**kwargs)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:
        self.begun += 1
        if self.begun == 2:
            self.paused.set()
            await self.go.wait()
        async with self.makers.begin() as session:
            yield session


@pytest.mark.committing
async def test_an_import_completes_between_two_chunks(
    committing_client: httpx.AsyncClient, app: FastAPI, engine: AsyncEngine, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An import batch waits for ERASURE_LOCK at most half its lease: a run holding it throughout failed the
    import. Between two chunks the lock is free, so the import is written there."""
    monkeypatch.setattr(gdpr, "RETENTION_CHUNK", CHUNK)
    client, sessions = committing_client, make_sessionmaker(engine)
    people = await _stale(sessions, 2 * CHUNK)
    tag = uuid.uuid4().hex[:8]
    job_id = await _upload(client, build_csv(["E-mail"], [(f"n{i}.{tag}@example.org",) for i in range(3)]))
    pausing = _Pausing(sessions)
    app.dependency_overrides[get_sessionmaker] = lambda: pausing
    running = asyncio.ensure_future(client.post("/v1/retention/run", json={"dry_run": False}, headers=ADMIN))
    try:
        await asyncio.wait_for(pausing.paused.wait(), timeout=10)
        assert not any([await _exists(sessions, p["id"]) for p in people[:CHUNK]])
        assert await asyncio.wait_for(runner.run_next(sessions, settings), timeout=10) is True
    finally:
        pausing.go.set()
    run = await running
    assert run.status_code == 200, run.text
    assert run.json()["erased"] == len(people)
    async with sessions() as session:
        job = (await session.execute(text("SELECT status, created FROM import_job WHERE id = :id"),
                                     {"id": uuid.UUID(job_id)})).one()
    assert tuple(job) == ("done", 3)


async def test_each_chunk_runs_under_the_workers_statement_timeout(
    client: httpx.AsyncClient, app: FastAPI, sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The route's connections have the interactive budget (10 s a statement); each chunk's transaction gets the
    worker's (BulkWriteSession gave it to the one transaction before). A run longer than either is never cut:
    the budget is a statement's, and each chunk's statements are short."""
    monkeypatch.setattr(gdpr, "RETENTION_CHUNK", CHUNK)
    erase_many, seen = gdpr.erase_many, []

    async def erase_noting_the_budget(session: AsyncSession, *args: Any, **kwargs: Any) -> int:
        seen.append(await session.scalar(text("SELECT current_setting('statement_timeout')")))
        return await erase_many(session, *args, **kwargs)

    monkeypatch.setattr(gdpr, "erase_many", erase_noting_the_budget)
    people = await _stale(sessions, CHUNK + 1)
    run = await client.post("/v1/retention/run", json={"dry_run": False}, headers=ADMIN)
    assert run.status_code == 200, run.text
    assert run.json()["erased"] == len(people)
    async with sessions.begin() as session:  # the worker's budget, as PostgreSQL shows it
        await session.execute(text(set_local(app.state.timeouts.worker)))
        worker = await session.scalar(text("SELECT current_setting('statement_timeout')"))
    assert worker != "10s" and seen == [worker, worker]


@pytest.mark.committing
async def test_the_command_erases_in_its_own_transactions(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, database_url: str, tmp_path: Path,
) -> None:
    """`carnet retention` gives the service its sessionmaker (it gave one transaction): the ids on stdout, erased."""
    sessions = make_sessionmaker(engine)
    people = await _stale(sessions, 2)
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "JWT_SECRET"}}
    env.update(PYTHONPATH=str(ROOT), DATABASE_URL=database_url, JWT_SECRET="cli-secret-" + "z" * 40)
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "app", "retention"], capture_output=True,
                                     text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert {p["id"] for p in people} <= set(result.stdout.split())
    assert not any([await _exists(sessions, p["id"]) for p in people])


async def test_a_run_stopped_halfway_leaves_its_chunks_erased_and_a_rerun_finishes(
    sessions: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second chunk fails (a crash, a timeout): the first stays erased, said to `committed` (the command prints
    it) and journaled; the others are untouched, and the next run erases them."""
    monkeypatch.setattr(gdpr, "RETENTION_CHUNK", CHUNK)
    people = await _stale(sessions, 2 * CHUNK + 1)
    actor = Principal("carnet-retention", Role.ADMIN, frozenset(), "cli")
    erase_many, calls, said = gdpr.erase_many, [], []

    async def failing_second(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the server went away")
        return await erase_many(*args, **kwargs)

    monkeypatch.setattr(gdpr, "erase_many", failing_second)
    with pytest.raises(RuntimeError):
        await gdpr.run_retention(sessions, days=1095, dry_run=False, actor=actor, committed=said.extend)
    assert [str(i) for i in said] == [p["id"] for p in people[:CHUNK]]
    assert [await _exists(sessions, p["id"]) for p in people] == [False] * CHUNK + [True] * (CHUNK + 1)
    assert [(e["part"], e["ref_count"], e["last"]) for e in await _runs(sessions)] == [(1, CHUNK, False)]
    monkeypatch.setattr(gdpr, "erase_many", erase_many)
    again = await gdpr.run_retention(sessions, days=1095, dry_run=False, actor=actor)
    assert [str(i) for i in again.contact_ids] == [p["id"] for p in people[CHUNK:]]
    assert not any([await _exists(sessions, p["id"]) for p in people])
