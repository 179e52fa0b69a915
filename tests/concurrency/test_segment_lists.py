"""A list deleted while a segment naming it is saved: a 4xx for one of them, never a segment naming no list.

`DELETE /v1/lists/{id}` is refused (409 `list-in-use`) while a segment's filter names the list, and a filter naming
an unknown list is a 422. The segment checked the list, then inserted: a delete committing in between left a saved
segment whose condition matched nobody. Deterministic: a helper connection holds the segment table, so the
segment's request stops after its check, while the delete runs.
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.concurrency.held import race_past_held_table
from tests.factories import ADMIN, make_list

pytestmark = pytest.mark.committing


async def test_a_list_deleted_while_a_segment_naming_it_is_saved_is_a_4xx_for_one_of_them(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    list_id = (await make_list(http))["id"]
    created, deleted = await race_past_held_table(  # the check passes, the insert waits
        helper, "segment",
        http.post("/v1/segments", headers=ADMIN, json={
            "name": "subscribers", "filter": {"field": "lists", "op": "eq", "value": list_id}}),
        http.delete(f"/v1/lists/{list_id}", headers=ADMIN))
    assert (created.status_code, deleted.status_code) in ((201, 409), (422, 204)), (created.text, deleted.text)
    orphans = await helper.fetchval("SELECT count(*) FROM segment s WHERE NOT EXISTS "
                                    "(SELECT 1 FROM list l WHERE s.filter::text LIKE '%' || l.id::text || '%')")
    assert orphans == 0
