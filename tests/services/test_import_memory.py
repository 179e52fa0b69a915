"""A hostile file cannot make the import runner hold it: memory stays a few MB whatever its rows hold.

Real transactions (`committing_client`): a file of many chunks is read while earlier batches are written, and
those run on other connections than the reading.
"""

from __future__ import annotations

import tracemalloc

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_sessionmaker
from app.services.imports import runner
from app.settings import Settings
from tests.factories import ADMIN

pytestmark = pytest.mark.committing


@pytest.mark.parametrize(("line", "rows"), [
    (b"q@example.com;" + b"ab;" * 349_000, 20),  # 349,000 cells in a 2-column file: ~18 MB of cell objects a row
    (b"q@example.com;" + b"y" * 1_000_000, 80),  # one 1 MB cell: each row held whole until its batch is written
], ids=["many-cells", "huge-cells"])
async def test_the_runner_holds_a_bounded_part_of_a_hostile_file(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings, line: bytes, rows: int,
) -> None:
    """20-80 MB of rows each under the 1 MiB record limit, every one refused. Before, a batch (10,000 rows) kept
    every row read: 808 MiB at the peak for the first file, 81 MiB for half the second; now a row is cut to the
    header's width and a batch ends after 8 MiB of the file (~46 MiB at the peak: four batches in the pipeline)."""
    data = b"Email;Nom\r\n" + b"\r\n".join([line] * rows) + b"\r\n"
    response = await committing_client.post("/v1/imports", files={"file": ("hostile.csv", data, "text/csv")},
                                            headers=ADMIN)
    assert response.status_code == 202, response.text
    tracemalloc.start()
    try:
        assert await runner.run_next(make_sessionmaker(engine), settings) is True
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    job = (await committing_client.get(f"/v1/imports/{response.json()['id']}", headers=ADMIN)).json()
    assert (job["status"], job["total_rows"], job["rejected"]) == ("done", rows, rows)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
