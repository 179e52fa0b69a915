"""A runner killed (SIGKILL) in the middle of an import: the job is taken over once its lease expires, resumes
from its last checkpoint, and ends with exactly the table an uninterrupted run gives."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import make_sessionmaker
from app.services.imports.runner import run_next
from app.settings import Settings
from tests.auth import TEST_SECRET
from tests.csv_samples import plain_file
from tests.factories import ADMIN

pytestmark = pytest.mark.committing

BATCH = 400
LEASE = 2.0
# The runner in a child process, slowed at the end of each batch so the test can kill it mid-file.
_CHILD = f"""
import asyncio, sys
from app.db import make_engine, make_sessionmaker
from app.schemas.types import configure_phone_region
from app.services.imports import runner
from app.settings import Settings

written = runner.write_batch
async def slow_write(*args, **kwargs):
    result = await written(*args, **kwargs)
    await asyncio.sleep(0.25)
    return result
runner.write_batch = slow_write

async def main():
    settings = Settings(database_url=sys.argv[1], jwt_secret={TEST_SECRET!r}, import_batch_rows={BATCH},
                        import_inline_bytes=0, import_workers=1, import_lease_seconds={LEASE}, _env_file=None)
    configure_phone_region(settings.default_phone_region)
    engine = make_engine(settings.database_url, pool_size=2)
    await runner.run_next(make_sessionmaker(engine), settings)
asyncio.run(main())
"""
_COLUMNS = ("email", "external_id", "first_name", "last_name", "phone", "city", "source", "kind", "tags",
            "attributes", "version")


def _file() -> bytes:
    # 6,000 rows, then 300 of them again (a second export pasted below: its header is a bad row, the rest
    # duplicates), then rows with bad values.
    bad = "\n".join(f"bad{i}@@shop.example.com,B,B,+33 6 00,Paris,X{i}" for i in range(40))
    return plain_file(6000) + plain_file(300, start=1000) + (bad + "\n").encode()


async def _upload(client: httpx.AsyncClient, data: bytes) -> str:
    response = await client.post("/v1/imports", files={"file": ("export.csv", data, "text/csv")},
                                 data={"tags": "resumed"}, headers=ADMIN)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def _job(sessions: async_sessionmaker[AsyncSession], job_id: str) -> dict[str, Any]:
    async with sessions() as session:
        return dict((await session.execute(text("SELECT * FROM import_job WHERE id = :id"), {"id": job_id})
                     ).mappings().one())


async def _snapshot(sessions: async_sessionmaker[AsyncSession], job_id: str) -> dict[str, Any]:
    async with sessions() as session:
        contacts = sorted(tuple(str(v) for v in r) for r in await session.execute(
            text(f"SELECT {', '.join(_COLUMNS)} FROM contact")))  # noqa: S608
        rejects = [tuple(r) for r in await session.execute(text(
            "SELECT row_number, \"column\", reason, value FROM import_reject WHERE import_id = :id "
            "ORDER BY row_number, reason"), {"id": job_id})]
        history = await session.scalar(text("SELECT count(*) FROM contact_history"))
        outbox = await session.scalar(text("SELECT count(*) FROM outbox_message"))
    job = await _job(sessions, job_id)
    counts = {k: job[k] for k in ("status", "total_rows", "processed_rows", "created", "updated", "unchanged",
                                  "skipped", "rejected")}
    return {"contacts": contacts, "rejects": rejects, "history": history, "outbox": outbox, "counts": counts}


async def test_killed_runner_resumes_to_the_same_table(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, database_url: str,
) -> None:
    sessions = make_sessionmaker(engine)
    quick = settings.model_copy(update={"import_batch_rows": BATCH, "import_inline_bytes": 0,
                                        "import_workers": 1, "import_lease_seconds": LEASE})
    data = _file()
    job_id = await _upload(committing_client, data)

    child = await asyncio.create_subprocess_exec(sys.executable, "-c", _CHILD, database_url,
                                                 start_new_session=True)
    deadline = time.monotonic() + 120
    while (await _job(sessions, job_id))["processed_rows"] < 3 * BATCH:
        assert child.returncode is None and time.monotonic() < deadline, "the child runner did not get going"
        await asyncio.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the runner and its validating process, mid-import
    await child.wait()

    killed = await _job(sessions, job_id)
    assert killed["status"] == "running" and 3 * BATCH <= killed["processed_rows"] < 6340
    assert await run_next(sessions, quick) is False  # its lease still runs: nobody takes the job over yet
    await asyncio.sleep(LEASE + 0.5)
    assert await run_next(sessions, quick) is True   # lease expired: resumed from the checkpoint
    resumed = await _job(sessions, job_id)
    assert (resumed["status"], resumed["attempts"]) == ("done", 2)
    after_resume = await _snapshot(sessions, job_id)

    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE contact, contact_history, outbox_message, tag, import_job CASCADE"))
    again = await _upload(committing_client, data)
    assert await run_next(sessions, quick) is True
    uninterrupted = await _snapshot(sessions, again)

    assert after_resume == uninterrupted
    assert after_resume["counts"] == {"status": "done", "total_rows": 6341, "processed_rows": 6341,
                                      "created": 6000, "updated": 0, "unchanged": 0, "skipped": 0, "rejected": 341}
    assert len(after_resume["contacts"]) == 6000
