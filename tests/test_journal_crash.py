"""The access journal's loss bound, against a live `carnet serve`: a clean stop loses nothing; SIGKILL loses at
most the reads answered in the last JOURNAL_FLUSH_SECONDS (plus the flush in flight) before the kill.

Four clients read one contact as fast as they can, each request with its own X-Request-ID; the entries in
`journal_entry` are then matched to the answers by request id.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.db import plain_dsn
from tests.auth import TEST_SECRET, bearer
from tests.faults.harness import LiveServer

pytestmark = pytest.mark.committing

FLUSH_SECONDS = 0.25
SLACK_SECONDS = 0.75       # a flush already under way when the kill lands, and the scheduler of a busy machine
CLIENTS = 4
ADMIN = bearer()


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path, database_url, TEST_SECRET, JOURNAL_FLUSH_SECONDS=str(FLUSH_SECONDS),
                      LOG_LEVEL="WARNING")
    live.start()
    try:
        yield live
    finally:
        if live.alive():
            live.proc.kill()  # type: ignore[union-attr]
            live.proc.wait()  # type: ignore[union-attr]


async def _load(base_url: str, seconds: float) -> dict[str, float]:
    """Read for `seconds`; the request id of every 200, with the monotonic time its answer arrived."""
    async with httpx.AsyncClient(base_url=base_url, headers=ADMIN, timeout=10) as http:
        created = await http.post("/v1/contacts", json={"email": f"{uuid.uuid4().hex[:10]}@example.com"})
        assert created.status_code == 201, created.text
        path = f"/v1/contacts/{created.json()['id']}"
        answered: dict[str, float] = {}
        deadline = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                request_id = uuid.uuid4().hex
                try:
                    response = await http.get(path, headers={"X-Request-ID": request_id})
                except httpx.TransportError:  # the server is gone (killed)
                    return
                if response.status_code == 200:
                    answered[request_id] = time.monotonic()

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        return answered


async def _journaled(database_url: str, request_ids: set[str]) -> set[str]:
    connection = await asyncpg.connect(plain_dsn(database_url))
    try:
        rows = await connection.fetch("SELECT request_id FROM journal_entry WHERE request_id = ANY($1::text[])",
                                      list(request_ids))
        return {r["request_id"] for r in rows}
    finally:
        await connection.close()


async def test_a_clean_stop_loses_no_entry(server: LiveServer, database_url: str) -> None:
    answered = await _load(server.base_url, 2.0)
    server.stop()  # SIGTERM: the lifespan flushes the buffer
    assert len(answered) > 50
    assert await _journaled(database_url, set(answered)) == set(answered)


async def test_sigkill_loses_at_most_the_last_flush_window(server: LiveServer, database_url: str) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, headers=ADMIN, timeout=10) as http:
        assert (await http.get("/v1/me")).status_code == 200
    load = asyncio.create_task(_load(server.base_url, 60.0))
    await asyncio.sleep(3.0)
    server.proc.kill()  # type: ignore[union-attr]  # SIGKILL: no lifespan, no last flush
    killed_at = time.monotonic()
    answered = await load  # the clients see the connection refused from now on
    lost = set(answered) - await _journaled(database_url, set(answered))
    late = [killed_at - answered[r] for r in lost if killed_at - answered[r] > FLUSH_SECONDS + SLACK_SECONDS]
    assert len(answered) > 50
    assert not late, f"{len(late)} reads answered up to {max(late):.2f} s before the kill were never journaled"
