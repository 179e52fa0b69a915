"""A segment deleted while a destination is given it to sync: a 4xx for one of them, never a 5xx.

`DELETE /v1/segments/{id}` is refused (409) while a destination syncs it; a destination naming an unknown segment
is a 422. The destination checked that the segment exists before writing its sync row: a delete committing in
between left the insert to a foreign-key violation (500). Deterministic: a helper connection holds the destination
table, so the destination's request stops after its check, while the delete runs.
"""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from tests.concurrency.held import race_past_held_table
from tests.factories import ADMIN
from tests.routers.test_segments import make_segment

pytestmark = pytest.mark.committing


async def test_a_segment_deleted_while_a_destination_maps_it_is_a_4xx_for_one_of_them(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    segment = await make_segment(http, {"all": [{"field": "tags", "op": "contains", "value": "vip"}]})
    created, deleted = await race_past_held_table(  # reads pass, the insert waits
        helper, "destination",
        http.post("/v1/destinations", headers=ADMIN, json={
            "kind": "webhook", "name": f"hook-{uuid.uuid4().hex[:6]}", "config": {"url": "http://placeholder.invalid/"},
            "segment_mappings": [{"segment_id": segment["id"]}]}),
        http.delete(f"/v1/segments/{segment['id']}", headers=ADMIN))
    assert created.status_code < 500, created.text
    assert (created.status_code, deleted.status_code) in ((201, 409), (422, 204)), (created.text, deleted.text)
