"""Two or more batches written at once (IMPORT_WRITERS, batch.Turn) end with exactly what one writer gives.

A file of updates, new people, duplicates of rows in the batch just before (by email and by external_id),
people matched by one key whose other key an earlier batch moves, erased people and a list subscription, cut in
batches of a few rows: run with one writer, then with two and three, on the same seeded database; the contacts,
the reject report, the counters, the history, the outbox, memberships and consents must be the same. Then a batch
that loses a race while the next one is being written: both roll back and are written again, to the same end.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import make_sessionmaker
from app.services import suppressions
from app.services.imports import batch, runner
from app.settings import Settings
from tests.conftest import TABLES
from tests.csv_samples import build_csv
from tests.factories import ADMIN, PROOF

pytestmark = pytest.mark.committing

BATCH = 7
EXISTING = 60        # contacts k0..k59 before the import; k0..k39 with external id X0..X39
SUPPRESSED = range(200, 206)


def _file(seed: int) -> bytes:
    draw = random.Random(seed)  # noqa: S311 (test data)
    rows = []
    for i in range(320):
        email = f"k{draw.randrange(250)}@shop.example" if draw.random() < 0.9 else ""
        external = f"X{draw.randrange(250)}" if draw.random() < 0.6 or not email else ""
        if i % 37 == 0:
            email = f"bad{i}@@shop.example"  # a row the validation refuses
        rows.append([email, external, f"First{draw.randrange(5)}", draw.choice(["Lyon", "Paris", "Nantes"])])
    return build_csv(["Email", "Customer ID", "First name", "City"], rows, delimiter=",", encoding="utf-8")


async def _seed(client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]) -> str:
    for i in range(EXISTING):
        body: dict[str, Any] = {"email": f"k{i}@shop.example", "first_name": "Before",
                                "address": {"city": "Avant"}}
        if i < 40:
            body["external_id"] = f"X{i}"
        response = await client.post("/v1/contacts", json=body, headers=ADMIN)
        assert response.status_code == 201, response.text
    async with sessions.begin() as session:
        await suppressions.suppress(session, [{"email": f"k{i}@shop.example", "phone": None} for i in SUPPRESSED],
                                    reason="erasure")
    response = await client.post("/v1/lists", json={"name": "news"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _import(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings, data: bytes,
    list_id: str,
) -> str:
    consent = {"occurred_at": "2025-06-01T10:00:00Z", "source": "salon", "proof": PROOF}
    response = await client.post(
        "/v1/imports", files={"file": ("export.csv", data, "text/csv")},
        data={"tags": "salon", "list_id": list_id, "consent": json.dumps(consent)}, headers=ADMIN)
    assert response.status_code == 202, response.text
    assert await runner.run_next(sessions, settings) is True
    return str(response.json()["id"])


async def _snapshot(sessions: async_sessionmaker[AsyncSession], job_id: str) -> dict[str, Any]:
    queries = {
        "contacts": "SELECT email, external_id, first_name, city, tags::text, version FROM contact "
                    "ORDER BY email NULLS LAST, external_id",
        "rejects": "SELECT row_number, \"column\", reason, value FROM import_reject WHERE import_id = :id "
                   "ORDER BY row_number, reason",
        "job": "SELECT status, error, processed_rows, created, updated, unchanged, skipped, rejected, subscribed "
               "FROM import_job WHERE id = :id",
        "history": "SELECT field, via, count(*) FROM contact_history GROUP BY 1, 2 ORDER BY 1, 2",
        "outbox": "SELECT topic, count(*) FROM outbox_message GROUP BY 1 ORDER BY 1",
        "members": "SELECT c.email, m.status FROM list_membership m JOIN contact c ON c.id = m.contact_id "
                   "ORDER BY 1",
        "consents": "SELECT c.email, e.action FROM consent_event e JOIN contact c ON c.id = e.contact_id ORDER BY 1",
    }
    async with sessions() as session:
        return {name: [tuple(r) for r in await session.execute(text(sql), {"id": job_id})]
                for name, sql in queries.items()}


async def _run(
    client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, *, seed: int,
) -> dict[str, Any]:
    async with engine.begin() as connection:
        await connection.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    sessions = make_sessionmaker(engine)
    list_id = await _seed(client, sessions)
    job_id = await _import(client, sessions, settings, _file(seed), list_id)
    return await _snapshot(sessions, job_id)


def _watch_overlap(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The most batches seen being written at once, as [n] (written after each batch)."""
    written, at_once, most = batch.write_batch, [0], [0]

    async def watched(*args: Any, **kwargs: Any) -> dict[str, int]:
        at_once[0] += 1
        most[0] = max(most[0], at_once[0])
        try:
            return await written(*args, **kwargs)
        finally:
            at_once[0] -= 1

    monkeypatch.setattr(runner, "write_batch", watched)
    return most


@pytest.mark.parametrize("seed", [1, 2])
async def test_writers_at_once_write_what_one_writer_writes(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
    seed: int,
) -> None:
    one = settings.model_copy(update={"import_batch_rows": BATCH, "import_writers": 1})
    expected = await _run(committing_client, engine, one, seed=seed)
    job = expected["job"][0]
    assert job[:2] == ("done", None)
    # the file exercises what it means to: creations, updates, duplicates, refusals, erased people, subscriptions
    assert all(job[i] > 0 for i in (3, 4, 6, 7, 8)), job
    reasons = {r[2] for r in expected["rejects"]}
    assert {"this email belongs to a contact with another external_id"} <= reasons
    assert any(r.startswith("duplicate of row") for r in reasons)

    for writers in (2, 3):
        most = _watch_overlap(monkeypatch)
        several = settings.model_copy(update={"import_batch_rows": BATCH, "import_writers": writers})
        assert await _run(committing_client, engine, several, seed=seed) == expected, f"{writers} writers"
        assert most[0] == writers  # they did overlap
        monkeypatch.undo()


async def test_a_batch_racing_while_the_next_is_written_is_written_again_with_it(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    one = settings.model_copy(update={"import_batch_rows": BATCH, "import_writers": 1})
    expected = await _run(committing_client, engine, one, seed=3)

    written, raced, ends = batch.write_batch, set(), []

    async def loses_a_race_once(connection: Any, job: Any, validated: Any, processed: int,
                                turn: batch.Turn | None = None) -> dict[str, int]:
        ends.append(processed)
        counts = await written(connection, job, validated, processed, turn)
        if processed in (3 * BATCH, 10 * BATCH) and processed not in raced:
            raced.add(processed)  # all its statements ran and the next batch is on its way: then it rolls back
            raise batch.Raced("a race, for the test")
        return counts

    monkeypatch.setattr(runner, "write_batch", loses_a_race_once)
    two = settings.model_copy(update={"import_batch_rows": BATCH, "import_writers": 2})
    assert await _run(committing_client, engine, two, seed=3) == expected
    assert ends.count(3 * BATCH) == 2 and ends.count(4 * BATCH) == 2  # the next one rolled back with it
