"""DATABASE_REPLICA_URL: exports and segment reads go to the replica, everything else to the primary.

The "replica" here is a second database with the same schema and different rows, so where each read went
shows in what it returns.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from app.db import plain_dsn
from app.main import create_app
from app.settings import Settings
from tests.conftest import migrated_database
from tests.factories import ADMIN


@pytest.fixture(scope="module")
def replica_url(server_url: str) -> Iterator[str]:
    with migrated_database(server_url, f"carnet_replica_{os.getpid()}") as url:
        yield url


async def _seed_replica(url: str) -> uuid.UUID:
    segment_id = uuid.uuid4()
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute("""
            INSERT INTO contact (id, email, email_status, kind, lifecycle_stage, attributes, tags, orders_count,
                                 total_spent, version, created_at, updated_at, source, city)
            SELECT gen_random_uuid(), 'replica-' || g || '@shop.example', 'unverified', 'prospect', 'prospect',
                   '{}', '{}', 0, 0, 1, now(), now(), 'api', 'Lyon' FROM generate_series(1, 3) g""")
        await conn.execute(
            "INSERT INTO segment (id, name, filter, version, created_at, updated_at) VALUES ($1, 'lyon', $2, 1, "
            "now(), now())", segment_id, '{"all": [{"field": "address.city", "op": "eq", "value": "Lyon"}]}')
    finally:
        await conn.close()
    return segment_id


async def test_exports_and_segment_reads_use_the_replica(
    replica_url: str, settings: Settings,
) -> None:
    segment_id = await _seed_replica(replica_url)
    app = create_app(settings.model_copy(update={"database_replica_url": replica_url}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as http:
        count = await http.get(f"/v1/segments/{segment_id}/count", headers=ADMIN)
        assert count.status_code == 200 and count.json() == {"count": 3}
        members = await http.get(f"/v1/segments/{segment_id}/contacts", headers=ADMIN)
        assert {c["email"] for c in members.json()["data"]} == {f"replica-{i}@shop.example" for i in (1, 2, 3)}
        export = await http.get("/v1/exports/contacts", params={"format": "jsonl"}, headers=ADMIN)
        assert export.status_code == 200 and export.text.count("replica-") == 3
        # Everything else reads the primary, where this segment does not exist.
        assert (await http.get(f"/v1/segments/{segment_id}", headers=ADMIN)).status_code == 404
        assert (await http.get("/v1/contacts", params={"city": "Lyon"}, headers=ADMIN)).json()["data"] == []
