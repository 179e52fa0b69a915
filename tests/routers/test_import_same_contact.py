"""Two rows of one file naming the same existing contact through different keys (one by email, one by external_id):
the first row (by row number) is that contact's row, a later one is rejected as `duplicate of row N`, within a
batch, across committed batches and across the batch being written alongside, in every mode and in dry runs.
Real transactions: two batches are written at once only outside a test's own transaction (runner._Writer)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import make_sessionmaker
from app.services.imports import batch, runner
from app.settings import Settings
from tests.csv_samples import build_csv
from tests.factories import PROOF, make_contact, make_list
from tests.routers.test_imports import count, report, rows, run_import

pytestmark = pytest.mark.committing

HEADER = ["Email", "Code client", "Prénom"]
# (batch rows, writers): one batch; a batch a row, two written at once (the row before is in flight); a batch a
# row, one writer (the row before is committed).
LAYOUTS = {"one_batch": (100, 2), "in_flight": (1, 2), "committed": (1, 1)}
MODES = {"upsert": {}, "update_only": {"mode": "update_only"}, "create_only": {"mode": "create_only"},
         "dry_run": {"dry_run": True}, "list": {"list": True}}


@pytest.fixture
def client(committing_client: httpx.AsyncClient) -> httpx.AsyncClient:
    return committing_client


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)


async def _job(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings, layout: str,
    options: dict[str, Any], data: bytes,
) -> dict[str, Any]:
    batch_rows, writers = LAYOUTS[layout]
    small = settings.model_copy(update={"import_batch_rows": batch_rows, "import_writers": writers})
    fields = dict(options)
    if fields.pop("list", False):
        fields |= {"list_id": (await make_list(client))["id"], "consent": {"proof": PROOF}}
    return await run_import(client, sessions, small, data, **fields)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODES))
async def test_a_later_row_naming_a_contact_an_earlier_row_matched_is_a_duplicate(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings, mode: str,
    layout: str,
) -> None:
    x = await make_contact(client, email="x@exemple.fr", external_id="X1", first_name="Avant")
    y = await make_contact(client, email="y@exemple.fr", external_id="Y1", first_name="Avant")
    data = build_csv(HEADER, [
        ["x@exemple.fr", None, "Par email"],         # 2: X, by its email
        ["autre@exemple.fr", "X1", "Par code"],      # 3: X again, by its external_id: duplicate of row 2
        [None, "Y1", "Par code"],                    # 4: Y, by its external_id
        ["y@exemple.fr", None, "Par email"],         # 5: Y again, by its email: duplicate of row 4
        ["nouveau@exemple.fr", None, "Nouveau"],     # 6: nobody
    ])
    job = await _job(client, sessions, settings, layout, MODES[mode], data)

    assert job["status"] == "done", job
    lines = [(r["row"], r["column"], r["reason"], r["value"]) for r in await report(client, job["id"])]
    assert [line for line in lines if line[2].startswith("duplicate")] == [
        ("3", "Code client", "duplicate of row 2", "X1"), ("5", "Email", "duplicate of row 4", "y@exemple.fr")]
    assert job["rejected"] == 2
    matched = {"upsert": (1, 2, 0), "list": (1, 2, 0), "dry_run": (1, 2, 0), "update_only": (0, 2, 1),
               "create_only": (1, 0, 2)}[mode]
    assert (job["created"], job["updated"], job["skipped"]) == matched
    assert job["processed_rows"] == 5
    if mode == "list":
        assert job["subscribed"] == 3
    names = dict(await rows(sessions, "SELECT email, first_name FROM contact WHERE id IN (:x, :y)",
                            x=uuid.UUID(x["id"]), y=uuid.UUID(y["id"])))
    if mode in ("upsert", "list", "update_only"):
        # each contact changed once, by its first row, with one history entry per field
        assert names == {"x@exemple.fr": "Par email", "y@exemple.fr": "Par code"}
        for contact in (x, y):
            entries = "SELECT count(*) FROM contact_history WHERE contact_id = :id AND via = 'import'"
            assert await count(sessions, entries, id=uuid.UUID(contact["id"])) == 1
    else:
        assert names == {"x@exemple.fr": "Avant", "y@exemple.fr": "Avant"}


async def test_a_later_batch_row_naming_a_contact_matched_far_earlier_is_a_duplicate(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings,
) -> None:
    """The earlier row's claim outlives the turn chain: it is read from the job's keys once committed."""
    await make_contact(client, email="x@exemple.fr", external_id="X1", first_name="Avant")
    filler = [[f"f{i}@exemple.fr", None, "F"] for i in range(5)]
    data = build_csv(HEADER, [["x@exemple.fr", None, "Premier"], *filler, [None, "X1", "Dernier"]])
    job = await _job(client, sessions, settings, "in_flight", {}, data)
    assert (job["created"], job["updated"], job["rejected"]) == (5, 1, 1)
    assert [(r["row"], r["reason"]) for r in await report(client, job["id"])] == [("8", "duplicate of row 2")]
    assert await rows(sessions, "SELECT first_name FROM contact WHERE external_id = 'X1'") == [("Premier",)]


@pytest.mark.parametrize("mode", ["dry_run", "upsert"])
async def test_the_batch_in_flight_ahead_hands_its_matched_contacts_to_the_next(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings,
    monkeypatch: pytest.MonkeyPatch, mode: str,
) -> None:
    """Row 2's batch holds its commit until row 3's batch has matched its row: row 3 learns of contact X from
    row 2's turn (a dry run locks nothing, so nothing else makes it wait)."""
    written = batch.write_batch

    async def slow_first_commit(connection: Any, job: Any, validated: Any, processed: int,
                                turn: batch.Turn | None = None) -> dict[str, int]:
        counts = await written(connection, job, validated, processed, turn)
        if processed == 1:
            await asyncio.sleep(1)
        return counts

    monkeypatch.setattr(runner, "write_batch", slow_first_commit)
    await make_contact(client, email="x@exemple.fr", external_id="X1", first_name="Avant")
    data = build_csv(HEADER, [["x@exemple.fr", None, "Premier"], [None, "X1", "Second"]])
    job = await _job(client, sessions, settings, "in_flight", MODES[mode], data)
    assert (job["updated"], job["rejected"]) == (1, 1)
    assert [(r["row"], r["reason"]) for r in await report(client, job["id"])] == [("3", "duplicate of row 2")]


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_a_row_repeating_a_key_of_such_a_duplicate_is_its_duplicate_in_any_batch(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings, layout: str,
) -> None:
    await make_contact(client, email="x@exemple.fr", external_id="X1", first_name="Avant")
    data = build_csv(HEADER, [["x@exemple.fr", None, "Premier"], ["neuf@exemple.fr", "X1", "Second"],
                              ["neuf@exemple.fr", None, "Troisième"]])
    job = await _job(client, sessions, settings, layout, {}, data)
    # in file order, whichever batch wrote its lines first (the report is read in the order lines were stored)
    assert [(r["row"], r["reason"]) for r in await report(client, job["id"])] == [
        ("3", "duplicate of row 2"), ("4", "duplicate of row 3")]
    assert (job["created"], job["updated"], job["rejected"]) == (0, 1, 2)
