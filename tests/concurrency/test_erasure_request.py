"""An erasure request completed by an admin while the person is erased another way: no deadlock.

Completing a request locked the request, then the contact (to erase it); any other erasure (DELETE
/v1/contacts/{id}, retention, the preference center) locks the contact, then completes the person's open
request: the opposite order. Both at once each held what the other waited for, and PostgreSQL ended one (40P01,
a 500). Deterministic: a helper connection holds the suppression table, so the DELETE stops inside the erasure
with the contact locked, while the completion takes the request and queues for the contact.
"""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from tests.concurrency.held import race_past_held_table
from tests.factories import ADMIN, make_contact

pytestmark = pytest.mark.committing


async def test_completing_a_request_while_the_person_is_erased_is_no_deadlock(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    person = await make_contact(http)
    request_id = await helper.fetchval(  # as the preference center files it (PREFERENCES_ERASURE=request)
        "INSERT INTO erasure_request (id, contact_id, status, source, requested_at) "
        "VALUES ($1, $2, 'open', 'preference_center', now()) RETURNING id", uuid.uuid4(), uuid.UUID(person["id"]))
    erased, completed = await race_past_held_table(  # the erasure's first write after its lock
        helper, "suppression",
        http.delete(f"/v1/contacts/{person['id']}", headers=ADMIN),
        http.post(f"/v1/erasure-requests/{request_id}/complete", headers=ADMIN))
    assert erased.status_code == 204, erased.text
    assert completed.status_code in (200, 409), completed.text
    status = await helper.fetchval("SELECT status FROM erasure_request WHERE id = $1", request_id)
    assert status == "completed"
    assert await helper.fetchval("SELECT count(*) FROM contact WHERE id = $1", uuid.UUID(person["id"])) == 0


async def test_the_erasure_confirmed_twice_at_once_in_the_preference_center_is_no_500(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    """A double submit of the preference center's erasure confirmation: both are answered, the person erased once."""
    from tests.routers.test_preferences import change

    http = committing_client
    person = await make_contact(http)
    confirmation = (await change(http, person["id"], {"erase": "request"})).json()["confirmation"]
    first, second = await race_past_held_table(
        helper, "suppression",
        change(http, person["id"], {"erase_confirmation": confirmation}),
        change(http, person["id"], {"erase_confirmation": confirmation}))
    assert first.status_code == 200, first.text
    assert second.status_code in (200, 410), second.text  # done by the first: the page is gone
