"""An import batch is one transaction on a connection left clean (issue 21, item 2), checked without races.

The runner works on the driver's connection (COPY needs it): these tests commit for real through a pool like the
worker's, since a test's outer transaction would hide statements that run outside the batch's transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import make_sessionmaker
from app.services.imports import batch, runner
from app.settings import Settings
from tests.csv_samples import build_csv, plain_file
from tests.factories import ADMIN, PROOF, make_attribute
from tests.routers.test_imports import report

pytestmark = pytest.mark.committing

_STAGED_TABLES = "SELECT count(*) FROM pg_class WHERE relname = 'import_stage' AND relpersistence = 't'"


async def _upload(client: httpx.AsyncClient, data: bytes, **form: str) -> str:
    response = await client.post("/v1/imports", files={"file": ("export.csv", data, "text/csv")}, data=form,
                                 headers=ADMIN)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def _one(sessions: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> Any:
    async with sessions() as session:
        return (await session.execute(text(sql), params)).one()


async def test_a_batch_failing_half_way_leaves_nothing_and_the_next_import_counts_right(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions = make_sessionmaker(engine)  # one pool, as the worker has
    small = settings.model_copy(update={"import_batch_rows": 3})
    # The statement after the contacts, their history and outbox rows are written fails.
    monkeypatch.setattr(batch, "_SEEN_SQL", "SELECT $1::uuid, $2::boolean, no_such_column FROM import_stage")
    failing = await _upload(committing_client, plain_file(5))
    assert await runner.run_next(sessions, small) is True
    job = await _one(sessions, "SELECT status, error, processed_rows FROM import_job WHERE id = :id", id=failing)
    assert (job.status, job.processed_rows) == ("failed", 0)
    assert job.error == "internal error (UndefinedColumnError)"
    written = await _one(sessions, "SELECT (SELECT count(*) FROM contact), (SELECT count(*) FROM contact_history), "
                                   "(SELECT count(*) FROM outbox_message)")
    assert tuple(written) == (0, 0, 0)  # the batch rolled back whole
    assert (await _one(sessions, _STAGED_TABLES))[0] == 0  # no staged row kept in a pooled connection

    monkeypatch.undo()
    again = await _upload(committing_client, plain_file(5, start=100))
    assert await runner.run_next(sessions, small) is True
    job = await _one(sessions, "SELECT status, created, processed_rows FROM import_job WHERE id = :id", id=again)
    assert tuple(job) == ("done", 5, 5)
    assert (await _one(sessions, "SELECT count(*) FROM contact"))[0] == 5
    assert (await _one(sessions, _STAGED_TABLES))[0] == 0


async def test_a_list_deleted_while_the_import_runs_fails_the_job_cleanly(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions = make_sessionmaker(engine)
    the_list = (await committing_client.post("/v1/lists", json={"name": "news"}, headers=ADMIN)).json()["id"]
    job_id = await _upload(committing_client, plain_file(5), list_id=the_list,
                           consent=f'{{"proof": {{"wording": "{PROOF["wording"]}"}}}}')
    prepare: Callable[..., Awaitable[batch.Job]] = runner._prepare

    async def prepared_then_list_deleted(*args: Any) -> batch.Job:
        job = await prepare(*args)
        deleted = await committing_client.delete(f"/v1/lists/{the_list}", headers=ADMIN)
        assert deleted.status_code == 204, deleted.text
        return job

    monkeypatch.setattr(runner, "_prepare", prepared_then_list_deleted)
    assert await runner.run_next(sessions, settings) is True
    job = await _one(sessions, "SELECT status, error FROM import_job WHERE id = :id", id=uuid.UUID(job_id))
    assert job.status == "failed"
    assert job.error == f"the list {the_list} was deleted while the import ran"
    assert (await _one(sessions, "SELECT count(*) FROM contact"))[0] == 0


async def test_a_batch_committing_later_than_the_lease_after_its_date_is_written_again_then_fails(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An incremental reader's overlap (docs/decisions.md) must cover it: a batch never commits later than
    IMPORT_LEASE_SECONDS after the date it gives its changes; it rolls back and is written again instead."""
    sessions = make_sessionmaker(engine)
    clock = iter([False, True] * 3)  # each attempt: the batch's date, then its end, one lease and a second later
    real = batch.utc_now
    monkeypatch.setattr(batch, "utc_now", lambda: real() + next(clock) * timedelta(
        seconds=settings.import_lease_seconds + 1))
    job_id = await _upload(committing_client, plain_file(3))
    assert await runner.run_next(sessions, settings) is True
    job = await _one(sessions, "SELECT status, error FROM import_job WHERE id = :id", id=uuid.UUID(job_id))
    assert job.status == "failed"
    assert job.error == ("a batch could not be written in 3 attempts (the batch took longer than "
                         "IMPORT_LEASE_SECONDS after its date); nothing of it was written: import the file again")
    assert (await _one(sessions, "SELECT count(*) FROM contact"))[0] == 0


async def test_an_attribute_deleted_while_the_import_runs_fails_the_job_and_writes_no_value(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The definitions are read when the job is prepared: a delete after that, when no contact holds a value yet,
    is allowed (204), and the batches must then not write values for the definition that is gone."""
    sessions = make_sessionmaker(engine)
    await make_attribute(committing_client, "shoe_size", "number")
    data = b"email,size\n" + b"".join(f"p{i}-{uuid.uuid4().hex[:6]}@example.com,{40 + i}\n".encode()
                                      for i in range(3))
    response = await committing_client.post(
        "/v1/imports", files={"file": ("sizes.csv", data, "text/csv")},
        data={"mapping": json.dumps({"email": "email", "size": "attributes.shoe_size"})}, headers=ADMIN)
    assert response.status_code == 202, response.text
    write = runner.write_batch

    async def deleted_then_written(*args: Any, **kwargs: Any) -> dict[str, int]:
        deleted = await committing_client.delete("/v1/attributes/shoe_size", headers=ADMIN)
        assert deleted.status_code in (204, 404), deleted.text  # 404: a batch written again
        return await write(*args, **kwargs)

    monkeypatch.setattr(runner, "write_batch", deleted_then_written)
    assert await runner.run_next(sessions, settings) is True
    job = await _one(sessions, "SELECT status, error FROM import_job WHERE id = :id",
                     id=uuid.UUID(response.json()["id"]))
    holders = (await _one(sessions, "SELECT count(*) FROM contact WHERE attributes ? 'shoe_size'"))[0]
    assert (job.status, holders) == ("failed", 0), (job, holders)
    assert job.error == "attribute definitions deleted while the import ran: shoe_size"


async def test_a_tag_deleted_while_the_import_runs_is_on_no_contact_outside_the_catalogue(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job's tags are created when it starts; one deleted while it runs is created again by the batches that
    give it, as tagging through the API creates it: a contact never holds a tag the catalogue lacks."""
    sessions = make_sessionmaker(engine)
    response = await committing_client.post(
        "/v1/imports", files={"file": ("fair.csv", plain_file(3), "text/csv")}, data={"tags": "fair-2026"},
        headers=ADMIN)
    assert response.status_code == 202, response.text
    write = runner.write_batch

    async def deleted_then_written(*args: Any, **kwargs: Any) -> dict[str, int]:
        deleted = await committing_client.delete("/v1/tags/fair-2026", headers=ADMIN)
        assert deleted.status_code in (204, 404), deleted.text
        return await write(*args, **kwargs)

    monkeypatch.setattr(runner, "write_batch", deleted_then_written)
    assert await runner.run_next(sessions, settings) is True
    job = await _one(sessions, "SELECT status, created FROM import_job WHERE id = :id",
                     id=uuid.UUID(response.json()["id"]))
    assert tuple(job) == ("done", 3)
    outside = await _one(sessions, "SELECT count(*) FROM contact c CROSS JOIN unnest(c.tags) t(name) "
                                   "WHERE NOT EXISTS (SELECT 1 FROM tag WHERE tag.name = t.name)")
    assert outside[0] == 0, f"{outside[0]} contact(s) hold a tag the catalogue lacks"


async def test_an_erasure_between_two_batches_leaves_no_key_naming_the_person_and_their_rows_stay_suppressed(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file's keys (`import_key`: the email and external id of rows that created no contact) name a person in
    clear. A row that updated the person, and a row of someone erased before (skipped as suppressed), left theirs
    there until the job ended, an erasure during the import notwithstanding. The person's rows after the erasure are
    skipped as suppressed, without their values, and the person is not re-created."""
    client, sessions = committing_client, make_sessionmaker(engine)
    tag = uuid.uuid4().hex[:8]
    person = {"email": f"ada.{tag}@example.org", "external_id": f"C-{tag}"}
    gone = f"gone.{tag}@example.org"
    ids = []
    for body in (person, {"email": gone}):
        created = await client.post("/v1/contacts", json=body, headers=ADMIN)
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    assert (await client.delete(f"/v1/contacts/{ids[1]}", headers=ADMIN)).status_code == 204
    data = build_csv(["E-mail", "Prénom", "Code client"], [
        (person["email"], "Ada", person["external_id"]),   # batch 1: updates the person
        (gone, "Gone", ""),                                # batch 1: erased before the import
        (person["email"], "Ada", person["external_id"]),   # batch 2, after the erasure
        (f"new.{tag}@example.org", "New", ""),
    ])
    job_id = await _upload(client, data)
    keys = "SELECT coalesce(array_agg(key ORDER BY key), '{}') FROM import_key WHERE import_id = :id"
    seen_mid_job: list[list[str]] = []
    write, calls = runner.write_batch, []

    async def erased_between_batches(*args: Any, **kwargs: Any) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 2:
            assert (await client.delete(f"/v1/contacts/{ids[0]}", headers=ADMIN)).status_code == 204
            seen_mid_job.append((await _one(sessions, keys, id=uuid.UUID(job_id)))[0])
        return await write(*args, **kwargs)

    monkeypatch.setattr(runner, "write_batch", erased_between_batches)
    one_by_one = settings.model_copy(update={"import_batch_rows": 2, "import_writers": 1})
    assert await runner.run_next(sessions, one_by_one) is True

    named = {f"e:{person['email']}", f"x:{person['external_id']}", f"e:{gone}"}
    assert seen_mid_job and not named & set(seen_mid_job[0]), seen_mid_job
    job = await _one(sessions, "SELECT status, created, updated, skipped FROM import_job WHERE id = :id",
                     id=uuid.UUID(job_id))
    assert tuple(job) == ("done", 1, 1, 2)
    again = await _one(sessions, "SELECT count(*) FROM contact WHERE email = :e OR external_id = :x",
                       e=person["email"], x=person["external_id"])
    assert again[0] == 0
    lines = await report(client, job_id)
    assert [(line["row"], line["value"]) for line in lines] == [("3", ""), ("4", "")]
    assert all(line["reason"].startswith("skipped: this person was erased") for line in lines)

