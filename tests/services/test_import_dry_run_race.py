"""A dry run racing a real import of the same file, and another dry run (review item: "the dry run's `import_key`
races"). `import_key` is per job (primary key: import id and key, docs/imports.md): no job reads another's keys, so
the runs agree on every duplicate, and a dry run counts what is committed when each of its batches reads."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_sessionmaker
from app.services.imports import runner
from app.settings import Settings
from tests.csv_samples import build_csv
from tests.factories import ADMIN
from tests.routers.test_imports import report
from tests.services.test_import_batch import _upload

pytestmark = pytest.mark.committing


def _file(tag: str) -> bytes:
    """40 people, each with an email and a customer number; 14 rows repeating one of the two."""
    rows = []
    for i in range(40):
        rows.append((f"p{i}.{tag}@example.org", f"X{i}-{tag}", f"First{i}"))
        if i % 5 == 0:
            rows.append((f"p{i}.{tag}@example.org", "", "Again"))
        if i % 7 == 0:
            rows.append(("", f"X{i}-{tag}", "Again"))
    return build_csv(["Email", "Customer ID", "First name"], rows)


async def _outcome(client: httpx.AsyncClient, job_id: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    job = (await client.get(f"/v1/imports/{job_id}", headers=ADMIN)).json()
    counts = {k: job[k] for k in ("status", "processed_rows", "created", "updated", "unchanged", "skipped",
                                  "rejected")}
    return counts, [(line["row"], line["reason"]) for line in await report(client, job_id)]


async def test_two_dry_runs_while_the_real_import_runs_agree_and_keep_to_their_own_keys(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, sessions = committing_client, make_sessionmaker(engine)
    small = settings.model_copy(update={"import_batch_rows": 7, "import_writers": 2})  # the dry runs'
    one_by_one = small.model_copy(update={"import_writers": 1})  # the real import: nothing commits while it waits
    data = _file(uuid.uuid4().hex[:6])
    real = await _upload(client, data)
    write, calls, dry = runner.write_batch, [], []

    async def dry_runs_half_way(connection: Any, job: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        if not job.row["dry_run"]:
            calls.append(1)
            if len(calls) == 4:  # 3 of the real import's 8 batches committed, the 4th about to be written
                dry.extend([await _upload(client, data, dry_run="true"), await _upload(client, data, dry_run="true")])
                assert all(await asyncio.gather(runner.run_next(sessions, small), runner.run_next(sessions, small)))
        return await write(connection, job, *args, **kwargs)

    monkeypatch.setattr(runner, "write_batch", dry_runs_half_way)
    assert await runner.run_next(sessions, one_by_one) is True
    (first, first_lines), (second, second_lines) = [await _outcome(client, job) for job in dry]
    real_counts, real_lines = await _outcome(client, real)
    assert (real_counts["status"], real_counts["created"], real_counts["rejected"]) == ("done", 40, 14)
    assert first == second and first_lines == second_lines == real_lines  # the same duplicates, the same rows
    assert (first["status"], first["processed_rows"], first["rejected"]) == ("done", 54, 14)
    assert first["created"] + first["unchanged"] == 40 and 0 < first["unchanged"] < 40, first  # read half way
    async with sessions() as session:
        assert await session.scalar(text("SELECT count(*) FROM import_key")) == 0  # every job dropped its own
