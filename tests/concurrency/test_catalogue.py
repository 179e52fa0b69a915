"""The catalogue (tags, attribute definitions) changed while contacts are written: its rules hold.

- `DELETE /v1/attributes/{name}` is refused while any contact holds a value: a contact write that read the
  definition and has not committed yet must not end up holding a value for a deleted definition;
- an attribute's options are only ever added: two PATCHes adding options at once must not remove each other's;
- `DELETE /v1/tags/{name}` takes the tag off every contact: a contact tagged by a write still open must not keep it.

Each race is made deterministic: a helper connection holds a lock the contact write (or both PATCHes) needs later,
so the write has read what decides it and is still open when the other request runs. The helper then lets go and
the final state is checked in SQL. These tests run in-process (`committing_client`: real, separate transactions).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import asyncpg
import httpx
import pytest

from tests.concurrency.held import race_past_held_table, until_waiting
from tests.factories import ADMIN, make_attribute, make_contact

pytestmark = pytest.mark.committing


def _start(call: Awaitable[httpx.Response]) -> asyncio.Task[httpx.Response]:
    return asyncio.ensure_future(call)


async def test_an_attribute_deleted_while_a_contact_is_given_a_value_is_refused(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    await make_attribute(http, "shoe_size", "number")
    contact = await make_contact(http)
    patched, deleted = await race_past_held_table(  # the PATCH stops at its outbox row
        helper, "outbox_message",
        http.patch(f"/v1/contacts/{contact['id']}", json={"attributes": {"shoe_size": 42}}, headers=ADMIN),
        http.delete("/v1/attributes/shoe_size", headers=ADMIN))
    assert patched.status_code == 200, patched.text
    holders = await helper.fetchval("SELECT count(*) FROM contact WHERE attributes ? 'shoe_size'")
    defined = await helper.fetchval("SELECT count(*) FROM attribute_definition WHERE name = 'shoe_size'")
    assert (deleted.status_code, holders, defined) == (409, 1, 1), (
        f"DELETE answered {deleted.status_code}; {holders} contact(s) hold a value, {defined} definition")


async def test_two_option_additions_at_once_do_not_remove_each_other(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    await make_attribute(http, "fit", "enum", options=["slim", "regular"])
    holding = helper.transaction()
    await holding.start()
    await helper.execute("SELECT 1 FROM attribute_definition WHERE name = 'fit' FOR SHARE")
    first = _start(http.patch("/v1/attributes/fit", json={"options": ["slim", "regular", "loose"]},
                              headers=ADMIN))
    second = _start(http.patch("/v1/attributes/fit", json={"options": ["slim", "regular", "oversized"]},
                               headers=ADMIN))
    await until_waiting(helper, 2)  # both read the definition (or queue for it), neither wrote
    await holding.rollback()
    answers = [await first, await second]
    options = set(await helper.fetchval("SELECT options FROM attribute_definition WHERE name = 'fit'"))
    applied = [set(r.json()["options"]) for r in answers if r.status_code == 200]
    assert {r.status_code for r in answers} <= {200, 422}, [r.text for r in answers]
    assert all(added <= options for added in applied), (
        f"stored options {sorted(options)}, yet PATCHes answered 200 with {[sorted(a) for a in applied]}")


async def _assert_vip_gone(helper: asyncpg.Connection) -> None:
    """The tag 'vip' was deleted: no contact holds it and the catalogue has it no more."""
    holders = await helper.fetchval("SELECT count(*) FROM contact WHERE 'vip' = ANY(tags)")
    in_catalogue = await helper.fetchval("SELECT count(*) FROM tag WHERE name = 'vip'")
    assert (holders, in_catalogue) == (0, 0), (
        f"the tag was deleted, yet {holders} contact(s) hold it ({in_catalogue} in the catalogue)")


async def test_a_tag_deleted_while_a_contact_is_tagged_leaves_no_contact_with_it(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    http = committing_client
    assert (await http.post("/v1/tags", json={"name": "vip"}, headers=ADMIN)).status_code == 201
    contact = await make_contact(http)
    tagged, deleted = await race_past_held_table(  # the tagging stops at its outbox row
        helper, "outbox_message", http.put(f"/v1/contacts/{contact['id']}/tags/vip", headers=ADMIN),
        http.delete("/v1/tags/vip", headers=ADMIN))
    assert tagged.status_code == 200, tagged.text
    assert deleted.status_code == 204, deleted.text
    await _assert_vip_gone(helper)


async def test_a_tag_deleted_while_its_holder_is_merged_leaves_it_on_no_one(
    committing_client: httpx.AsyncClient, helper: asyncpg.Connection,
) -> None:
    """The merge gives the survivor the duplicate's tags; the delete, waiting for the duplicate the merge holds,
    must not leave the tag on the survivor."""
    http = committing_client
    survivor = await make_contact(http)
    duplicate = await make_contact(http, tags=["vip"])
    merged, deleted = await race_past_held_table(  # the merge stops at its outbox rows
        helper, "outbox_message",
        http.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]}, headers=ADMIN),
        http.delete("/v1/tags/vip", headers=ADMIN))
    assert merged.status_code == 200, merged.text
    assert deleted.status_code == 204, deleted.text
    await _assert_vip_gone(helper)
