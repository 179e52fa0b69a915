"""Imports under concurrency (issue 21, items 1, 2 and 8): a CSV import runs through a live `carnet worker` while
API clients of a live `carnet serve` write the same people; the invariant is checked in SQL afterwards.

Both processes run against this test run's database; the worker writes batches of BATCH_ROWS rows, so one
import is many transactions, each racing the clients. Each test repeats ROUNDS rounds with fresh people and
counts the violations over all of them (printed; run with -s to see them), then asserts there are none.

- Nobody withdrawn is subscribed: an import subscribing its file to a list while clients withdraw
  `email_marketing` from those people (item 1).
- An import batch is a unit: an import changing emails (rows matched by external_id) while clients create
  contacts with those emails: per-row `email_held` refusals, never a failed job; no staged row survives its
  batch in a pooled connection; the next import on the same worker counts what it writes (item 2).
- Import timestamps never go backwards: an import updating people while clients edit them; every change is
  dated after the one it overwrites, and an `updated_after` reader sees every import change (item 8).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import plain_dsn
from tests.auth import TEST_SECRET, bearer
from tests.csv_samples import build_csv
from tests.emptying import empty_every_table, execute_alone
from tests.faults.harness import LiveServer
from tests.faults.test_sync_outage import WorkerProcess

pytestmark = pytest.mark.committing

ADMIN = bearer()
BATCH_ROWS = 25          # rows per import transaction in the worker: many batches, each racing the clients
PEOPLE = 300             # people per round
ROUNDS = 3
CLIENTS = 8
JOB_TIMEOUT_SECONDS = 120
OVERLAP = timedelta(seconds=120)  # the incremental readers' overlap: IMPORT_LEASE_SECONDS (docs/decisions.md)


@dataclass
class Live:
    api: LiveServer
    worker: WorkerProcess
    database_url: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def live(
    database_url: str, engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    """The API and a worker, live; every table emptied once both are stopped (everything here was committed)."""
    workdir = tmp_path_factory.mktemp("imports-live")
    api = LiveServer(workdir / "api", database_url, TEST_SECRET, RUN_WORKER_IN_API="false", LOG_LEVEL="WARNING",
                     DATABASE_POOL_TIMEOUT="30")
    worker = WorkerProcess(workdir, database_url)
    worker.env.update(IMPORT_BATCH_ROWS=str(BATCH_ROWS), WORKER_IDLE_SECONDS="0.05")
    api.start()
    try:
        worker.start()
        yield Live(api, worker, database_url)
    finally:
        worker.stop()
        api.stop()
        await empty_every_table(functools.partial(execute_alone, engine))


@pytest_asyncio.fixture
async def http(live: Live) -> AsyncIterator[httpx.AsyncClient]:
    """Clients of the live API. Each round works on people of its own: nothing is emptied between tests."""
    # Idle connections are dropped before uvicorn's 5 s keep-alive ends: reusing one it is closing is a ReadError.
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=live.api.base_url, limits=limits, timeout=60, headers=ADMIN) as client:
        yield client
    assert live.worker.proc is not None and live.worker.proc.poll() is None, "the worker died"


@pytest_asyncio.fixture
async def db(live: Live) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(plain_dsn(live.database_url))
    try:
        yield conn
    finally:
        await conn.close()


# ---- helpers ---------------------------------------------------------------------------------------------


@dataclass
class Statuses:
    """Every answer the clients got, by status: a 5xx is a failure of the test whatever else holds."""
    seen: dict[int, int] = field(default_factory=dict)

    def add(self, response: httpx.Response) -> httpx.Response:
        self.seen[response.status_code] = self.seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, response.text
        return response


async def make_contacts(http: httpx.AsyncClient, items: Sequence[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(items), 1000):
        response = await http.post("/v1/contacts/batch", json={"items": list(items[start:start + 1000])})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert all(r["status"] == "created" for r in results), results
        ids += [r["id"] for r in results]
    return ids


async def start_import(http: httpx.AsyncClient, data: bytes, **fields: Any) -> str:
    form = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in fields.items()}
    response = await http.post("/v1/imports", files={"file": ("clients.csv", data, "text/csv")}, data=form)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def finished(http: httpx.AsyncClient, job_id: str, progress: Progress | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        job = (await http.get(f"/v1/imports/{job_id}")).json()
        if progress is not None:
            progress.rows = job["processed_rows"]
        if job["status"] in ("done", "failed"):
            return job  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    pytest.fail(f"import {job_id} not finished after {JOB_TIMEOUT_SECONDS} s")


@dataclass
class Progress:
    """The job's committed checkpoint, followed while it runs: clients aim at the rows being written."""
    rows: int = 0

    def near(self, items: Sequence[Any]) -> Sequence[Any]:
        """The items of the batch being written and of the next one (the clients race those)."""
        start = min(self.rows, len(items) - 1)
        return items[start:start + 2 * BATCH_ROWS]


async def while_running(http: httpx.AsyncClient, job_id: str, client: Any) -> dict[str, Any]:
    """Run CLIENTS copies of `client(n, stop, progress)` until the job is over, then answer the finished job."""
    stop, progress = asyncio.Event(), Progress()
    tasks = [asyncio.create_task(client(n, stop, progress)) for n in range(CLIENTS)]
    try:
        job = await finished(http, job_id, progress)
    finally:
        stop.set()
    await asyncio.gather(*tasks)
    return job


def counted(job: dict[str, Any]) -> bool:
    parts = ("created", "updated", "unchanged", "skipped", "rejected")
    return bool(job["processed_rows"] == sum(job[k] for k in parts))


def tag() -> str:
    return uuid.uuid4().hex[:8]


# ---- item 1: nobody withdrawn is subscribed ----------------------------------------------------------------

# Members of the list whose latest email_marketing event (in the order things happened) is a withdrawal.
_WITHDRAWN_BUT_MEMBERS = """
SELECT count(*) FROM list_membership m
WHERE m.list_id = $1 AND m.status IN ('subscribed', 'pending')
  AND (SELECT e.action FROM consent_event e
       WHERE e.contact_id = m.contact_id AND e.purpose = 'email_marketing'
       ORDER BY e.occurred_at DESC, e.id DESC LIMIT 1) = 'withdrawn'
"""


async def test_an_import_never_subscribes_someone_who_withdrew(http: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    statuses = Statuses()
    violations = [await _withdrawals_during_an_import(http, db, statuses) for _round in range(ROUNDS)]
    print(f"withdrawn yet subscribed, per round: {violations}; answers {statuses.seen}")
    assert violations == [0] * ROUNDS


async def _withdrawals_during_an_import(http: httpx.AsyncClient, db: asyncpg.Connection, statuses: Statuses) -> int:
    """One round: the file of PEOPLE is subscribed to a new list while clients withdraw them; the violations."""
    run = tag()
    emails = [f"w{i}-{run}@exemple.fr" for i in range(PEOPLE)]
    ids = await make_contacts(http, [{"email": e} for e in emails])
    the_list = (await http.post("/v1/lists", json={"name": f"news-{run}"})).json()["id"]
    job_id = await start_import(http, build_csv(["E-mail"], [[e] for e in emails]), list_id=the_list,
                                consent={"proof": {"wording": "J'accepte la newsletter"}})
    rng = random.Random(run)  # noqa: S311 (test data)

    async def withdraw(_n: int, stop: asyncio.Event, progress: Progress) -> None:
        while not stop.is_set():
            statuses.add(await http.post(f"/v1/contacts/{rng.choice(progress.near(ids))}/consents", json={
                "purpose": "email_marketing", "action": "withdrawn", "source": "preference_center"}))

    job = await while_running(http, job_id, withdraw)
    assert job["status"] == "done", job
    assert counted(job), job
    assert await db.fetchval("SELECT count(*) FROM list_membership WHERE list_id = $1",
                             uuid.UUID(the_list)) > 0, "the import subscribed nobody: no race was run"
    return int(await db.fetchval(_WITHDRAWN_BUT_MEMBERS, uuid.UUID(the_list)))


# ---- item 2: an import batch is a unit ---------------------------------------------------------------------

_STAGED_TABLES = "SELECT count(*) FROM pg_class WHERE relname = 'import_stage' AND relpersistence = 't'"


async def test_an_email_taken_meanwhile_is_a_refused_row_and_the_batch_stays_whole(
    live: Live, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    statuses = Statuses()
    rounds = [await _emails_taken_during_an_import(http, db, statuses) for _round in range(ROUNDS)]
    # The same worker (its pooled connections) then runs an ordinary import and counts exactly what it writes.
    run = tag()
    fresh = [f"fresh{i}-{run}@exemple.fr" for i in range(PEOPLE)]
    job = await finished(http, await start_import(http, build_csv(["E-mail"], [[e] for e in fresh])))
    stored = await db.fetchval("SELECT count(*) FROM contact WHERE email = ANY($1::text[])", fresh)
    log = live.worker.log.read_text(errors="replace")
    print(f"per round (job, rows not as promised, staging tables left): {rounds}; then a plain import: "
          f"{job['status']}, created {job['created']}, stored {stored}; answers {statuses.seen}; the worker "
          f"settled {log.count('import.keys_taken_meanwhile')} taken keys in its batch, rewrote "
          f"{log.count('import.batch_raced')} batches")
    assert rounds == [("done", 0, 0)] * ROUNDS
    assert (job["status"], job["created"], stored) == ("done", PEOPLE, PEOPLE)
    assert await db.fetchval(_STAGED_TABLES) == 0


async def _emails_taken_during_an_import(
    http: httpx.AsyncClient, db: asyncpg.Connection, statuses: Statuses
) -> tuple[str, int, int]:
    """One round: the file gives PEOPLE contacts (matched by external_id) a new email while clients create contacts
    with those emails. (the job's status, or its error; the rows not as promised; staging tables left)."""
    run = tag()
    externals = [f"C{i}-{run}" for i in range(PEOPLE)]
    ids = await make_contacts(http, [{"external_id": x, "email": f"old{i}-{run}@exemple.fr"}
                                     for i, x in enumerate(externals)])
    new = [f"new{i}-{run}@exemple.fr" for i in range(PEOPLE)]
    job_id = await start_import(http, build_csv(["Identifiant client", "E-mail"], zip(externals, new, strict=True)))
    order = list(range(PEOPLE))
    random.Random(run).shuffle(order)  # noqa: S311 (test data)
    created: dict[int, str] = {}

    async def take_emails(n: int, _stop: asyncio.Event, _progress: Progress) -> None:
        for i in order[n::CLIENTS]:
            response = statuses.add(await http.post("/v1/contacts", json={"email": new[i]}))
            assert response.status_code in (201, 409), response.text
            if response.status_code == 201:
                created[i] = response.json()["id"]
            await asyncio.sleep(0.002)

    job = await while_running(http, job_id, take_emails)
    assert created, "no client created a contact: no race was run"
    refused = {r["row_number"] - 2 for r in await db.fetch(
        "SELECT row_number FROM import_reject WHERE import_id = $1 AND reason = $2",
        uuid.UUID(job_id), "another contact already holds this email")}
    holders = {r["email"]: str(r["id"]) for r in await db.fetch(
        "SELECT id, email FROM contact WHERE email = ANY($1::text[])", new)}
    # Each new email is held by one contact: the file's (the import came first), or the client's (then the import
    # refused that row and left its contact as it was). Nothing in between, nothing lost.
    wrong = 0
    for i in range(PEOPLE):
        if i in created:
            wrong += holders.get(new[i]) != created[i] or i not in refused
        else:
            wrong += holders.get(new[i]) != ids[i] or i in refused
    status = job["status"] if job["status"] == "done" and counted(job) else f"{job['status']}: {job['error']}"
    return status, wrong, int(await db.fetchval(_STAGED_TABLES))


# ---- item 8: import timestamps never go backwards ----------------------------------------------------------

# History entries dated before an earlier entry of the same contact (ids are taken under the contact's lock).
_BACKDATED = """
SELECT count(*) FROM (
    SELECT at < max(at) OVER (PARTITION BY contact_id ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
           AS backwards
    FROM contact_history WHERE contact_id = ANY($1::uuid[])
) h WHERE backwards
"""


async def test_import_changes_are_dated_after_what_they_overwrite_and_incremental_reads_see_them(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    statuses = Statuses()
    rounds = [await _edits_during_an_import(http, db, statuses) for _round in range(ROUNDS)]
    print(f"per round (history entries dated before an earlier one, versions not dated after the one before, "
          f"contacts whose last version the reader missed): {rounds}; answers {statuses.seen}")
    assert rounds == [(0, 0, 0)] * ROUNDS


async def _edits_during_an_import(
    http: httpx.AsyncClient, db: asyncpg.Connection, statuses: Statuses
) -> tuple[int, int, int]:
    """One round: the file updates PEOPLE contacts while clients edit them and one client reads the changes
    incrementally."""
    run = tag()
    emails = [f"t{i}-{run}@exemple.fr" for i in range(PEOPLE)]
    ids = await make_contacts(http, [{"email": e, "company": "Avant"} for e in emails])
    mine = set(ids)
    seen: dict[str, dict[int, datetime]] = {}  # contact → version → updated_at, as the reader saw them
    cursor = datetime.fromisoformat((await http.get(f"/v1/contacts/{ids[0]}")).json()["created_at"])
    cursor -= timedelta(seconds=1)

    async def read_changes() -> None:
        """The incremental reader: updated_after its last seen updated_at, minus the documented overlap."""
        nonlocal cursor
        since, newest, page = cursor - OVERLAP, cursor, None
        while True:
            params: dict[str, Any] = {"sort": "updated_at", "updated_after": since.isoformat(), "limit": 1000}
            if page:
                params["cursor"] = page
            body = statuses.add(await http.get("/v1/contacts", params=params)).json()
            for c in body["data"]:
                if c["id"] in mine:
                    at = datetime.fromisoformat(c["updated_at"])
                    seen.setdefault(c["id"], {})[c["version"]] = at
                    newest = max(newest, at)
            page = body["next_cursor"]
            if page is None:
                break
        cursor = newest

    job_id = await start_import(http, build_csv(["E-mail", "Société"], [[e, f"Import {run}"] for e in emails]))
    rng = random.Random(run)  # noqa: S311 (test data)

    async def edit(n: int, stop: asyncio.Event, progress: Progress) -> None:
        while not stop.is_set():
            if n == 0:
                await read_changes()
                await asyncio.sleep(0.1)  # a reader polls; the editors keep the server busy meanwhile
            else:
                patch = {"job_title": f"v{rng.random()}"}
                statuses.add(await http.patch(f"/v1/contacts/{rng.choice(progress.near(ids))}", json=patch))

    job = await while_running(http, job_id, edit)
    assert (job["status"], job["updated"]) == ("done", PEOPLE), job
    await read_changes()
    final = {str(r["id"]): (r["version"], r["updated_at"]) for r in await db.fetch(
        "SELECT id, version, updated_at FROM contact WHERE id = ANY($1::uuid[])", [uuid.UUID(i) for i in ids])}
    backdated = int(await db.fetchval(_BACKDATED, [uuid.UUID(i) for i in ids]))
    # A later version is dated after every earlier one (else a reader who saw the earlier one never learns of the
    # later one), and the reader ends up with every contact's last version.
    out_of_order = sum(_out_of_order(seen.get(cid, {}) | {final[cid][0]: final[cid][1]}) for cid in ids)
    missed = sum(1 for cid in ids if max(seen.get(cid, {0: None})) != final[cid][0])
    return backdated, out_of_order, missed


def _out_of_order(stamps: dict[int, datetime]) -> int:
    """Versions not dated strictly after the version before them."""
    dates = [at for _version, at in sorted(stamps.items())]
    return sum(1 for earlier, later in itertools.pairwise(dates) if later <= earlier)


# ---- the same new people created by the import and by API clients at once -----------------------------------

# Rows the import gave up on because another writer created their contact first (the job said "import it again").
_RACED_REASON = "another writer created a contact with this email or external_id meanwhile; import the row again"


@pytest.mark.parametrize("writer", ["batch", "upsert"])
async def test_people_created_meanwhile_by_the_api_are_updated_by_the_import_never_refused(
    live: Live, http: httpx.AsyncClient, db: asyncpg.Connection, writer: str
) -> None:
    """API clients create the file's new people while the import creates them: batches of several of them in
    another order than the file's (`POST /v1/contacts/batch`), or one at a time (`POST /v1/contacts/upsert`).
    Whoever comes first creates the contact and the other updates it, as two API upserts do: every client gets a
    2xx, the job is done, each person is one contact carrying both writers' fields, and no row is refused."""
    statuses = Statuses()
    rounds = [await _people_created_during_an_import(http, db, statuses, writer) for _round in range(ROUNDS)]
    deadlocks = live.worker.log.read_text(errors="replace").count("DeadlockDetected")
    print(f"per round (job, contacts not as promised, rows refused as raced): {rounds}; answers {statuses.seen}; "
          f"import batches rewritten after a deadlock so far: {deadlocks}")
    assert rounds == [("done", 0, 0)] * ROUNDS


async def _people_created_during_an_import(
    http: httpx.AsyncClient, db: asyncpg.Connection, statuses: Statuses, writer: str
) -> tuple[str, int, int]:
    run = tag()
    emails = [f"n{i}-{run}@exemple.fr" for i in range(PEOPLE)]
    job_id = await start_import(http, build_csv(["E-mail", "Société"], [[e, "Import"] for e in emails]))
    rng = random.Random(run)  # noqa: S311 (test data)
    made: set[str] = set()

    async def create(_n: int, stop: asyncio.Event, progress: Progress) -> None:
        while not stop.is_set():
            near = list(progress.near(emails))
            if writer == "batch":
                chosen = rng.sample(near, min(6, len(near)))  # in another order than the file's
                response = statuses.add(await http.post("/v1/contacts/batch", json={
                    "items": [{"email": e, "job_title": "API"} for e in chosen]}))
                assert response.status_code == 200, response.text
                assert all(r["status"] in ("created", "updated") for r in response.json()["results"]), response.text
            else:
                chosen = [rng.choice(near)]
                response = statuses.add(await http.post("/v1/contacts/upsert",
                                                        json={"email": chosen[0], "job_title": "API"}))
                assert response.status_code in (200, 201), response.text
            made.update(chosen)

    job = await while_running(http, job_id, create)
    assert made, "no client wrote: no race was run"
    stored = await db.fetch("SELECT email, company, job_title FROM contact WHERE email = ANY($1::text[])", emails)
    by_email = {r["email"]: r for r in stored}
    wrong = len(emails) - len(stored) + sum(
        r["company"] != "Import" or (r["email"] in made) != (r["job_title"] == "API") for r in stored)
    raced = int(await db.fetchval("SELECT count(*) FROM import_reject WHERE import_id = $1 AND reason = $2",
                                  uuid.UUID(job_id), _RACED_REASON))
    assert len(by_email) == len(stored)
    status = job["status"] if job["status"] == "done" and counted(job) else f"{job['status']}: {job['error']}"
    return status, wrong, raced


async def test_two_imports_of_overlapping_files_at_once_make_each_person_once(
    live: Live, http: httpx.AsyncClient, db: asyncpg.Connection, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two workers run two imports of the same new people at once, the second file in another order (or an import
    and `carnet import` at the same time): both jobs are done, each person is one contact, created by one job and
    matched by the other, and no row is refused."""
    other = WorkerProcess(tmp_path_factory.mktemp("imports-second-worker"), live.database_url)
    other.env.update(IMPORT_BATCH_ROWS=str(BATCH_ROWS), WORKER_IDLE_SECONDS="0.05")
    other.start()
    try:
        rounds = [await _two_overlapping_imports(http, db) for _round in range(ROUNDS)]
    finally:
        other.stop()
    print(f"per round (jobs, contacts not as promised, rows refused): {rounds}")
    assert rounds == [(("done", "done"), 0, 0)] * ROUNDS


async def _two_overlapping_imports(http: httpx.AsyncClient, db: asyncpg.Connection) -> tuple[tuple[str, ...], int, int]:
    run = tag()
    emails = [f"o{i}-{run}@exemple.fr" for i in range(PEOPLE)]
    shuffled = random.Random(run).sample(emails, len(emails))  # noqa: S311 (test data)
    first = await start_import(http, build_csv(["E-mail", "Société"], [[e, "Un"] for e in emails]))
    second = await start_import(http, build_csv(["E-mail", "Fonction"], [[e, "Deux"] for e in shuffled]))
    jobs = [await finished(http, first), await finished(http, second)]
    stored = await db.fetch("SELECT company, job_title FROM contact WHERE email = ANY($1::text[])", emails)
    wrong = len(emails) - len(stored) + sum((r["company"], r["job_title"]) != ("Un", "Deux") for r in stored)
    refused = sum(j["rejected"] for j in jobs)
    wrong += sum(j["created"] for j in jobs) != len(emails)
    return tuple(j["status"] if counted(j) else f"{j['status']}: {j['error']}" for j in jobs), wrong, refused
