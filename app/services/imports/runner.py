"""The import job runner: claim a job, read its file from PostgreSQL, validate rows in worker processes,
and hand each batch to `batch.write_batch`, which writes it set-based in one transaction that also commits the
checkpoint (retried here when it loses a race with another writer).

A killed runner leaves its last batch uncommitted; once the lease expires another runner claims the job and
resumes after `processed_rows`. Parsing is deterministic, so the final contact table is the same as after an
uninterrupted run. `run_next` is the worker's entry point; `run_job` runs one given job (the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from app.db import driver_connection
from app.logging import get_logger, where
from app.schemas import types
from app.services import suppressions
from app.services.imports import rows as rows_module
from app.services.imports.batch import Job, JobProblem, LeaseLost, Raced, Turn, write_batch
from app.services.imports.rows import Spec, Validated
from app.services.imports.sniff import RecordReader, Unreadable
from app.services.links import LinkBuilder, LinkCodec
from app.settings import Settings

__all__ = ["LeaseLost", "Progress", "digest_key", "new_owner", "run_job", "run_next"]

log = get_logger("carnet.imports")

Progress = Callable[[Mapping[str, Any]], None]
_DB_AWAY = (OSError, DBAPIError, InterfaceError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)

_PARSE_BYTES = 64 * 1024  # parsed at once (~2 ms): how long the writer may wait for the event loop
# A batch also ends once this much of the file was read for it: rows of 1 MiB each (the record limit) would
# otherwise make a batch of IMPORT_BATCH_ROWS hold gigabytes. A real file's 10,000 rows are 1-3 MB.
_BATCH_BYTES = 8 * 1024 * 1024


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def run_next(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> bool:
    """Claim one queued job (or a running one whose lease expired), run it; True if there was one."""
    owner = new_owner()
    async with sessions.begin() as session:
        connection = await driver_connection(session)
        job = await connection.fetchrow(_CLAIM_SQL, owner, settings.import_lease_seconds)
    if job is None:
        return False
    await _run(sessions, settings, dict(job), owner=owner, progress=None)
    return True


async def run_job(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, job_id: uuid.UUID, *, owner: str,
    progress: Progress | None = None,
) -> Mapping[str, Any]:
    """Run a job this caller already holds the lease of (the CLI creates it claimed); returns the final row."""
    async with sessions() as session:
        job = await (await driver_connection(session)).fetchrow("SELECT * FROM import_job WHERE id = $1", job_id)
    await _run(sessions, settings, dict(job), owner=owner, progress=progress)
    async with sessions() as session:
        return dict(await (await driver_connection(session)).fetchrow("SELECT * FROM import_job WHERE id = $1", job_id))


_CLAIM_SQL = """
UPDATE import_job j
SET status = 'running', lease_owner = $1, lease_until = now() + make_interval(secs => $2),
    attempts = j.attempts + 1, started_at = coalesce(j.started_at, clock_timestamp()), updated_at = now()
WHERE j.id = (
    SELECT id FROM import_job
    WHERE status = 'queued' OR (status = 'running' AND lease_until < now())
    ORDER BY created_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING j.*
"""


# ---- one job ---------------------------------------------------------------------------------------------


async def _run(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, row: dict[str, Any], *, owner: str,
    progress: Progress | None,
) -> None:
    job_id = row["id"]
    log.info("import.claimed", import_id=str(job_id), attempt=row["attempts"], resume_at=row["processed_rows"])
    if row["attempts"] > settings.import_max_attempts:
        await _finish(sessions, job_id, owner, status="failed",
                      error=f"gave up after {row['attempts'] - 1} attempts (the runner kept dying on this file)")
        return
    try:
        job = await _prepare(sessions, settings, row, owner)
        await _process(sessions, job, progress)
    except JobProblem as exc:
        await _finish(sessions, job_id, owner, status="failed", error=str(exc))
        log.warning("import.failed", import_id=str(job_id), error=str(exc))
    except LeaseLost:
        log.warning("import.lease_lost", import_id=str(job_id))  # another runner has it now; nothing to undo
    except _DB_AWAY:
        raise  # not this job's fault: the lease expires and another attempt resumes from the checkpoint
    except Exception as exc:
        with contextlib.suppress(*_DB_AWAY):
            await _finish(sessions, job_id, owner, status="failed", error=f"internal error ({type(exc).__name__})")
        log.error("import.crashed", import_id=str(job_id), **where(exc))


async def _prepare(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, row: dict[str, Any], owner: str
) -> Job:
    mapping: dict[str, str] = row["mapping"]
    header: list[str] = row["header"]
    attribute_names = [f.removeprefix("attributes.") for f in mapping.values() if f.startswith("attributes.")]
    types.configure_phone_region(settings.default_phone_region)  # inline validation reads national numbers too
    async with sessions() as session:
        connection = await driver_connection(session)
        definitions = {r["name"]: (r["type"], tuple(r["options"] or ())) for r in await connection.fetch(
            "SELECT name, type, options FROM attribute_definition WHERE name = ANY($1::text[])", attribute_names)}
        if row["list_id"] is not None and not await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM list WHERE id = $1)", row["list_id"]):
            raise JobProblem(f"the list {row['list_id']} was deleted before the import ran")
    missing = sorted(set(attribute_names) - set(definitions))
    if missing:
        raise JobProblem(f"attribute definitions deleted before the import ran: {', '.join(missing)}")
    spec = Spec(
        columns=tuple((int(i), f, header[int(i)]) for i, f in sorted(mapping.items(), key=lambda kv: int(kv[0]))),
        attributes=definitions, digest_key=digest_key(settings), width=len(header),
        blank_erases=row["blank_erases"],
    )
    async with sessions() as session:
        row_keys_kept = await (await driver_connection(session)).fetchval(_ROW_KEYS_KEPT_SQL, row["id"])
    links = None  # the list may become double opt-in while the job runs: each batch reads it again
    if row["list_id"] is not None:
        links = LinkBuilder(LinkCodec(settings.resolved_jwt_secret()), settings.public_base_url)
    return Job(row=row, owner=owner, settings=settings, spec=spec,
               columns_by_field={f: header[int(i)] for i, f in mapping.items()}, links=links,
               counts={k: row[k] for k in ("created", "updated", "unchanged", "skipped", "rejected", "subscribed")},
               row_keys_kept=row_keys_kept)


_ROW_KEYS_KEPT_SQL = "SELECT EXISTS (SELECT 1 FROM import_key WHERE import_id = $1 AND key > 'd')"  # 'e:', 'x:' > 'c:'


async def _process(sessions: async_sessionmaker[AsyncSession], job: Job, progress: Progress | None) -> None:
    settings = job.settings
    if job.row["tags"] and not job.row["dry_run"]:
        async with sessions.begin() as session:
            await (await driver_connection(session)).execute(
                "INSERT INTO tag (name, created_at) SELECT unnest($1::text[]), now() ON CONFLICT DO NOTHING",
                job.row["tags"])
    pool = _pool(settings) if settings.import_workers and job.row["size_bytes"] > settings.import_inline_bytes else None
    loop = asyncio.get_running_loop()
    pending: deque[tuple[Awaitable[Validated], int]] = deque()
    writer = _Writer(sessions, job, progress, processed=job.row["processed_rows"])
    try:
        async for batch in _batches(sessions, job, skip=writer.processed, size=settings.import_batch_rows):
            pending.append((_validate(loop, pool, job.spec, batch), len(batch)))
            if len(pending) > (settings.import_workers if pool else 0):
                await writer.start(*pending.popleft())
        while pending:
            await writer.start(*pending.popleft())
        processed = await writer.wait()
    finally:
        await writer.abandon()
        for validated, _count in pending:
            if isinstance(validated, asyncio.Future):
                validated.cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    await _finish(sessions, job.id, job.owner, status="done", error=None, total_rows=processed)
    log.info("import.done", import_id=str(job.id), rows=processed, **job.counts)


class _Writer:
    """Writes validated batches in a task each, `IMPORT_WRITERS` (2) at a time on as many connections (batch.Turn):
    the runner reads, parses and hands out the next batches meanwhile, and while one batch's statements run the next
    one's do too (PostgreSQL's work on a batch is one backend's: alone it leaves the other core to the validating
    process). Batches commit in the file's order, so the checkpoint stays a row count."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], job: Job, progress: Progress | None, *, processed: int
    ) -> None:
        self._sessions, self._job, self._progress = sessions, job, progress
        self.processed = processed  # the committed checkpoint
        self._planned = processed   # the checkpoint once every batch started is committed
        self._flights: deque[_Flight] = deque()
        # A sessionmaker bound to one connection (a caller's own transaction) can write only one batch at a time.
        self._writers = 1 if isinstance(sessions.kw.get("bind"), AsyncConnection) else job.settings.import_writers

    async def start(self, validated: Awaitable[Validated], count: int) -> None:
        """Start writing this batch once a writer is free (a failed batch's error is raised here)."""
        while len(self._flights) >= self._writers:
            await self._land()
        self._planned += count
        self._append(validated, self._planned)

    async def wait(self) -> int:
        while self._flights:
            await self._land()
        return self.processed

    async def abandon(self) -> None:
        """Stop writes still running because the job stops for another reason: their transactions roll back."""
        for flight in self._flights:
            flight.task.cancel()
        for flight in self._flights:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await flight.task
        self._flights.clear()

    def _append(self, validated: Awaitable[Validated], end: int) -> None:
        """Start writing a batch behind the ones being written (their last one is its `earlier`)."""
        flight = _Flight(validated=validated, end=end,
                         turn=Turn(earlier=self._flights[-1].turn if self._flights else None))
        flight.task = asyncio.create_task(self._fly(flight))
        self._flights.append(flight)

    async def _fly(self, flight: _Flight) -> dict[str, int]:
        try:
            flight.rows = await flight.validated
            async with self._sessions.begin() as session:
                counts = await write_batch(await driver_connection(session), self._job, flight.rows, flight.end,
                                           flight.turn)
        except BaseException:
            flight.turn.settle(committed=False)
            raise
        flight.turn.settle(committed=True)
        return counts

    async def _land(self) -> None:
        """The oldest batch's outcome. If it lost a race, the batch after it rolls back too (it would commit after
        a batch that is not there); once it has, the oldest is written again alone, then the next one again."""
        flight = self._flights.popleft()
        try:
            counts = await flight.task
        except _RACES as exc:
            _raced(self._job, 1, exc)
            following = [*self._flights]
            self._flights.clear()
            for later in following:  # each sees the batch before it rolled back, and rolls back
                with contextlib.suppress(Exception):
                    await later.task
            assert flight.rows is not None  # a race is the database's answer: the rows were validated
            counts = await _write(self._sessions, self._job, flight.rows, flight.end, attempts=range(2, _ATTEMPTS + 1))
            for later in following:
                self._append(later.validated, later.end)
        for key, value in counts.items():
            self._job.counts[key] += value
        self.processed = flight.end
        _report(self._progress, self._job, self.processed)


@dataclass(slots=True, eq=False)
class _Flight:
    validated: Awaitable[Validated]
    end: int                        # the checkpoint once it is committed
    turn: Turn
    rows: Validated | None = None
    task: asyncio.Task[dict[str, int]] = field(init=False)


def _pool(settings: Settings) -> Executor:
    # spawn: a worker loads only what validation needs, not a copy of the runner's memory (RSS budget)
    return ProcessPoolExecutor(
        max_workers=settings.import_workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=rows_module.init_worker, initargs=(settings.default_phone_region,),
    )


def _validate(
    loop: asyncio.AbstractEventLoop, pool: Executor | None, spec: Spec, batch: list[tuple[int, list[str]]]
) -> Awaitable[Validated]:
    if pool is None:
        done: asyncio.Future[Validated] = loop.create_future()
        done.set_result(rows_module.validate(spec, batch))
        return done
    future: Future[Validated] = pool.submit(rows_module.validate, spec, batch)
    return asyncio.wrap_future(future)


def _report(progress: Progress | None, job: Job, processed: int) -> None:
    if progress is not None:
        progress({"processed_rows": processed, **job.counts})


async def _batches(
    sessions: async_sessionmaker[AsyncSession], job: Job, *, skip: int, size: int
) -> AsyncIterator[list[tuple[int, list[str]]]]:
    """Data records as (row number, cells), in batches, after the first `skip` (the checkpoint)."""
    record_number = 0   # every record of the file, header included: the report's row numbers
    seen = 0            # non-empty data records
    header_done = False
    batch: list[tuple[int, list[str]]] = []
    read = 0            # bytes of the file read since the batch began
    async for records, piece in _records(sessions, job):
        read += piece
        for cells in records:
            record_number += 1
            if not "".join(cells).strip() and not isinstance(cells, Unreadable):
                continue  # blank lines (Excel leaves some at the end) are not rows
            if not header_done:
                header_done = True
                continue
            seen += 1
            if seen <= skip:
                continue
            batch.append((record_number, cells))
            if len(batch) >= size or read >= _BATCH_BYTES:
                yield batch
                batch, read = [], 0
    if batch:
        yield batch


async def _records(sessions: async_sessionmaker[AsyncSession], job: Job) -> AsyncIterator[tuple[list[list[str]], int]]:
    """The file's records in order, parsed a piece at a time, with the piece's size: between pieces the event loop
    runs the writer's statements, so PostgreSQL does not wait while a 1 MB chunk is parsed."""
    reader = RecordReader(job.row["encoding"], job.row["delimiter"], width=job.spec.width)
    for seq in range(job.row["chunks"]):
        async with sessions() as session:
            data = await (await driver_connection(session)).fetchval(
                "SELECT data FROM import_chunk WHERE import_id = $1 AND seq = $2", job.id, seq)
        for start in range(0, len(data), _PARSE_BYTES):
            piece = data[start:start + _PARSE_BYTES]
            yield reader.feed(piece), len(piece)
            await asyncio.sleep(0)
    yield reader.close(), 0


# ---- one batch -------------------------------------------------------------------------------------------


# Races a batch's transaction cannot settle itself: rolled back whole (nothing of the batch stays) and written again.
_RACES = (Raced, asyncpg.DeadlockDetectedError, asyncpg.SerializationError, asyncpg.LockNotAvailableError)
_ATTEMPTS = 3


async def _write(
    sessions: async_sessionmaker[AsyncSession], job: Job, validated: Validated, processed: int, *,
    attempts: range = range(1, _ATTEMPTS + 1),
) -> dict[str, int]:
    """Write one validated batch and its checkpoint in one transaction, alone; again, from the start, after a race."""
    for attempt in attempts:
        try:
            async with sessions.begin() as session:
                return await write_batch(await driver_connection(session), job, validated, processed)
        except _RACES as exc:
            _raced(job, attempt, exc)
    raise AssertionError("unreachable")  # pragma: no cover


def _raced(job: Job, attempt: int, exc: BaseException) -> None:
    """Log a lost race; after the last attempt, fail the job."""
    log.info("import.batch_raced", import_id=str(job.id), attempt=attempt, race=type(exc).__name__)
    if attempt >= _ATTEMPTS:
        reason = str(exc) if isinstance(exc, Raced) else f"{type(exc).__name__}, with another writer"
        raise JobProblem(f"a batch could not be written in {attempt} attempts ({reason}); nothing of it "
                         "was written: import the file again") from exc


# ---- helpers ---------------------------------------------------------------------------------------------


async def _finish(
    sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID, owner: str, *, status: str, error: str | None,
    total_rows: int | None = None,
) -> None:
    """Done or failed: either way the job is over (a failed import is re-run by uploading the file again), so its
    file and its key table go. The file holds every person of the file: kept, it would outlive their erasure."""
    async with sessions.begin() as session:
        connection = await driver_connection(session)
        moved = await connection.fetchval(
            """UPDATE import_job SET status = $3, error = $4, total_rows = coalesce($5, total_rows),
                   finished_at = clock_timestamp(), lease_owner = NULL, lease_until = NULL, updated_at = now()
               WHERE id = $1 AND lease_owner = $2 RETURNING id""",
            job_id, owner, status, error, total_rows,
        )
        if moved is None:
            raise LeaseLost(f"import {job_id} was taken over by another runner")
        await connection.execute("DELETE FROM import_key WHERE import_id = $1", job_id)
        await connection.execute("DELETE FROM import_chunk WHERE import_id = $1", job_id)


def digest_key(settings: Settings) -> bytes:
    """The suppression list's HMAC key, for the worker processes (configured as the API does, if not yet)."""
    if not suppressions.configured():
        suppressions.configure(settings.resolved_suppression_key())
    return suppressions.key()

