"""An import batch racing the erasure (or the merge) of a person it names, made deterministic with a held batch.

The batch is stopped after it decided what it writes (its report lines and keys), still open; the erasure or merge
is sent then, and the batch goes on once that request has finished or waits for a lock (tests/concurrency/held.py).
Either order must end as if one ran entirely before the other: no report value nor key names the erased person, they
are not created again, and a merged-away contact gets no half of a row.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import make_sessionmaker, plain_dsn
from app.services import locks
from app.services.imports import batch, runner
from app.settings import Settings
from tests.concurrency.held import until_waiting
from tests.csv_samples import build_csv
from tests.factories import ADMIN
from tests.services.test_import_batch import _upload

pytestmark = pytest.mark.committing


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, to watch for requests waiting on a lock."""
    connection = await asyncpg.connect(plain_dsn(database_url))
    yield connection
    await connection.close()


async def _person(client: httpx.AsyncClient) -> tuple[str, str, dict[str, Any]]:
    """A tag, the person's email and the person (with an external_id `C-<tag>`)."""
    tag = uuid.uuid4().hex[:8]
    email = f"ada.{tag}@example.org"
    created = await client.post("/v1/contacts", json={"email": email, "external_id": f"C-{tag}"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    return tag, email, created.json()


async def _scalar(sessions: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> Any:
    async with sessions() as session:
        return await session.scalar(text(sql), params)


def _racing_batch(monkeypatch: pytest.MonkeyPatch, db: asyncpg.Connection, step: str,
                  request: Callable[[], Awaitable[httpx.Response]], answers: list[asyncio.Future[httpx.Response]],
                  ) -> None:
    """The first batch that runs `step` (a function of app.services.imports.batch: `_update`, the contacts written;
    `_hide_erased_duplicates`, a report with duplicates decided) stops after it, sends `request`, and goes on when
    that finished or waits for a lock; the request's answer is put in `answers`, for the test to await."""
    done, calls = getattr(batch, step), []

    async def then_raced(*args: Any, **kwargs: Any) -> None:
        await done(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            sent = asyncio.ensure_future(request())
            await until_waiting(db, 1, or_done=sent)
            answers.append(sent)

    monkeypatch.setattr(batch, step, then_raced)


async def test_an_erasure_while_a_later_batch_repeats_the_person_leaves_no_value_naming_them(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batch 2 repeats the person's row of batch 1 (`duplicate of row 2`, the address as its value) and takes no lock
    on them (a duplicate is never staged): an erasure committing after batch 2 checked the suppression list, and
    before its report lines were written, scrubbed the reports without them. The address stayed in the report."""
    client, sessions = committing_client, make_sessionmaker(engine)
    tag, email, person = await _person(client)
    data = build_csv(["E-mail", "Prénom"], [
        (email, "Ada"), (f"b.{tag}@example.org", "Bob"),      # batch 1: updates the person
        (email, "Ada"), (f"c.{tag}@example.org", "Carl"),     # batch 2: a duplicate of row 2, raced by the erasure
    ])
    job_id = await _upload(client, data)
    answers: list[asyncio.Future[httpx.Response]] = []
    _racing_batch(monkeypatch, db, "_hide_erased_duplicates",
                  lambda: client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN), answers)
    assert await runner.run_next(sessions, settings.model_copy(update={"import_batch_rows": 2})) is True
    assert (await answers[0]).status_code == 204
    status = await _scalar(sessions, "SELECT status FROM import_job WHERE id = :id", id=uuid.UUID(job_id))
    naming = await _scalar(sessions, "SELECT count(*) FROM import_reject WHERE value = :v", v=email)
    lines = await _scalar(sessions, "SELECT count(*) FROM import_reject WHERE import_id = :id", id=uuid.UUID(job_id))
    assert (status, lines) == ("done", 1)
    assert naming == 0, "a report line names the erased person"
    back = await _scalar(sessions, "SELECT count(*) FROM contact WHERE email = :e", e=email)
    assert back == 0


async def test_an_erasure_during_a_dry_run_batch_leaves_no_key_naming_the_person(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dry run locks nothing and leaves every row's keys in `import_key` (docs/imports.md): an erasure committing
    while the batch was open deleted the keys already there and never saw the batch's, which named the person in
    clear until the job ended."""
    client, sessions = committing_client, make_sessionmaker(engine)
    tag, email, person = await _person(client)
    data = build_csv(["E-mail", "Code client"], [
        (email, f"C-{tag}"), (f"b.{tag}@example.org", ""),   # batch 1, raced by the erasure
        (f"c.{tag}@example.org", ""),                         # batch 2: the keys are read before it
    ])
    job_id = await _upload(client, data, dry_run="true")
    answers: list[asyncio.Future[httpx.Response]] = []
    _racing_batch(monkeypatch, db, "_update",
                  lambda: client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN), answers)
    write, keys_seen = runner.write_batch, []

    async def looked_at_between(*args: Any, **kwargs: Any) -> dict[str, int]:
        if answers:  # the erasure has committed (it may have waited for batch 1)
            assert (await answers[0]).status_code == 204
        keys_seen.append(await _scalar(
            sessions, "SELECT count(*) FROM import_key WHERE import_id = :id AND key IN (:e, :x)",
            id=uuid.UUID(job_id), e=f"e:{email}", x=f"x:C-{tag}"))  # in clear (an `m:` key holds an id only)
        return await write(*args, **kwargs)

    monkeypatch.setattr(runner, "write_batch", looked_at_between)
    one_by_one = settings.model_copy(update={"import_batch_rows": 2, "import_writers": 1})
    assert await runner.run_next(sessions, one_by_one) is True
    assert (await answers[0]).status_code == 204
    assert keys_seen == [0, 0], "the job kept keys naming the erased person while it ran"


async def test_a_merge_while_a_batch_updates_the_duplicate_moves_a_whole_row(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch updates the duplicate (matched by its email, locked); the merge sent meanwhile waits for the batch
    and then moves the whole update to the survivor: the import's history and outbox rows follow the contact, none
    points at a contact that is gone, and the survivor holds the imported value."""
    client, sessions = committing_client, make_sessionmaker(engine)
    tag = uuid.uuid4().hex[:8]
    survivor = (await client.post("/v1/contacts", json={"email": f"kept.{tag}@example.org"}, headers=ADMIN)).json()
    duplicate = (await client.post("/v1/contacts", json={"email": f"dup.{tag}@example.net"}, headers=ADMIN)).json()
    job_id = await _upload(client, build_csv(["E-mail", "Société"], [(f"dup.{tag}@example.net", f"Acme {tag}")]))
    answers: list[asyncio.Future[httpx.Response]] = []
    _racing_batch(monkeypatch, db, "_update", lambda: client.post(
        f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]}, headers=ADMIN), answers)
    assert await runner.run_next(sessions, settings) is True
    merged = await answers[0]
    assert merged.status_code == 200, merged.text
    job = await _scalar(sessions, "SELECT status || ':' || updated FROM import_job WHERE id = :id",
                        id=uuid.UUID(job_id))
    assert job == "done:1"
    assert merged.json()["company"] == f"Acme {tag}"
    orphans = await _scalar(sessions, "SELECT count(*) FROM contact_history h WHERE NOT EXISTS "
                                      "(SELECT 1 FROM contact c WHERE c.id = h.contact_id)")
    assert orphans == 0


# ---- where each takes ERASURE_LOCK (app/services/locks.py): first, before any row or bucket lock -------------


def _bucket(email: str) -> int:
    return locks._buckets([f"email:{email}"])[0]


async def test_a_batch_waiting_for_an_erasure_holds_no_key_bucket_an_api_batch_waits_for(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, db: asyncpg.Connection,
    database_url: str,
) -> None:
    """An erasure (a retention chunk erasing 1,000 holds it for as long as it runs) holds ERASURE_LOCK; an import
    batch reaching it waited there holding the SHARE key buckets of all its rows and its contacts, so an API batch
    creating anyone whose key fell in one of those buckets (with 10,000 rows: all 64) waited for the erasure too,
    past its statement timeout (a 503), and the import failed after three lock timeouts."""
    client, sessions = committing_client, make_sessionmaker(engine)
    tag = uuid.uuid4().hex[:8]
    emails = [f"n{i}.{tag}@example.org" for i in range(5)]
    taken = {_bucket(e) for e in emails}
    newcomer = next(e for e in (f"api{i}.{tag}@example.org" for i in range(10_000)) if _bucket(e) in taken)
    job_id = await _upload(client, build_csv(["E-mail"], [(e,) for e in emails]))

    eraser = await asyncpg.connect(plain_dsn(database_url))
    erasing = eraser.transaction()
    await erasing.start()
    await eraser.execute("SELECT pg_advisory_xact_lock($1)", locks.ERASURE_LOCK)  # an erasure under way
    importing = asyncio.ensure_future(runner.run_next(sessions, settings))
    answered: asyncio.Future[httpx.Response] | None = None
    try:
        await until_waiting(db, 1, or_done=importing)  # the batch waits for the erasure
        answered = asyncio.ensure_future(client.post(
            "/v1/contacts/batch", json={"items": [{"email": newcomer}]}, headers=ADMIN))
        done, _ = await asyncio.wait({answered}, timeout=3)
        assert done, "an API batch creating a new contact waited for an erasure it has nothing to do with"
    finally:
        await erasing.rollback()
        await eraser.close()
        if answered is not None:
            await asyncio.wait({answered})
    assert answered.result().status_code == 200, answered.result().text
    assert await importing is True
    async with sessions() as session:
        status = await session.scalar(text("SELECT status FROM import_job WHERE id = :id"), {"id": uuid.UUID(job_id)})
    assert status == "done"


async def test_an_erasure_of_a_person_a_running_batch_is_about_to_update_waits_for_it(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch holds ERASURE_LOCK (SHARE) and is about to lock the contacts its rows name; the erasure of one of
    them is sent then. An erasure that locked the person first and then asked for the lock would wait for the batch
    that waits for the person: a deadlock, one of the two aborted. Either one runs entirely before the other: the
    person erased, not created again, the job done (not a gap before the lock moved first in both; kept so that
    the order stays one)."""
    client, sessions = committing_client, make_sessionmaker(engine)
    tag = uuid.uuid4().hex[:8]
    email = f"ada.{tag}@example.org"
    person = (await client.post("/v1/contacts", json={"email": email}, headers=ADMIN)).json()
    job_id = await _upload(client, build_csv(["E-mail", "Prénom"], [(email, "Ada"), (f"b.{tag}@example.org", "Bob")]))
    answers: list[asyncio.Future[httpx.Response]] = []
    share, calls = locks.share_key_buckets, []

    async def then_erased(*args: Any, **kwargs: Any) -> None:
        await share(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # before the batch locks the contacts holding its keys
            sent = asyncio.ensure_future(client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN))
            await until_waiting(db, 1, or_done=sent)
            answers.append(sent)

    monkeypatch.setattr(batch.locks, "share_key_buckets", then_erased)
    assert await runner.run_next(sessions, settings) is True
    erased = await answers[0]
    assert erased.status_code == 204, erased.text
    async with sessions() as session:
        job = (await session.execute(text("SELECT status, updated FROM import_job WHERE id = :id"),
                                     {"id": uuid.UUID(job_id)})).one()
        left = await session.scalar(text("SELECT count(*) FROM contact WHERE email = :e"), {"e": email})
    assert job[0] == "done"
    assert left == 0


async def test_an_import_outlasts_an_erasure_longer_than_its_lock_timeout(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, db: asyncpg.Connection,
    database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retention run held ERASURE_LOCK for as long as it erased (minutes for a first run; now a chunk at a time,
    tests/services/test_retention_chunks.py). A batch waited for it
    under its 10 s lock timeout, three times, and the job failed ("could not be written in 3 attempts"): every
    import running during a retention run. It waits up to half its lease (here the lock timeout is 0.2 s, the
    erasure 1.5 s)."""
    monkeypatch.setattr(batch, "_LOCK_TIMEOUT", "200ms")
    client, sessions = committing_client, make_sessionmaker(engine)
    tag = uuid.uuid4().hex[:8]
    job_id = await _upload(client, build_csv(["E-mail"], [(f"n{i}.{tag}@example.org",) for i in range(3)]))
    eraser = await asyncpg.connect(plain_dsn(database_url))
    erasing = eraser.transaction()
    await erasing.start()
    await eraser.execute("SELECT pg_advisory_xact_lock($1)", locks.ERASURE_LOCK)  # an erasure under way
    try:
        importing = asyncio.ensure_future(runner.run_next(sessions, settings))
        await until_waiting(db, 1, or_done=importing)
        await asyncio.wait({importing}, timeout=1.5)
    finally:
        await erasing.rollback()
        await eraser.close()
    assert await importing is True
    async with sessions() as session:
        job = (await session.execute(text("SELECT status, created FROM import_job WHERE id = :id"),
                                     {"id": uuid.UUID(job_id)})).one()
    assert tuple(job) == ("done", 3)
