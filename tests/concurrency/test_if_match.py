"""If-Match writers lose no update (issue 8; an invariant that held under the review of issue 21).

50 read-modify-write clients on one contact, each with its own token and connection, each adding its tag and 1 to
a counter under If-Match and retrying on 412: every effect is in the record, the version counts the writes, and
in SQL one history row per write and one `contact.updated` outbox message per write.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest

from app.security import Role
from tests.auth import bearer
from tests.concurrency.conftest import ADMIN, Race
from tests.factories import unique_email

CLIENTS = 50
MAX_ATTEMPTS = 400          # per client; with jittered retries a client needs a few dozen at worst


def client_tokens() -> list[dict[str, str]]:
    return [bearer(Role.EDITOR, subject=f"client-{i}@shop.example") for i in range(CLIENTS)]


async def test_fifty_read_modify_write_clients_lose_no_update(race: Race) -> None:
    counter = f"hits_{uuid.uuid4().hex[:8]}"
    await race.ok("POST", "/v1/attributes", json={"name": counter, "type": "number"})
    created = await race.ok("POST", "/v1/contacts", json={"email": unique_email(), "attributes": {counter: 0}})
    contact_id, start_version = created["id"], created["version"]
    url = f"/v1/contacts/{contact_id}"
    conflicts = [0] * CLIENTS

    async def client(i: int, headers: dict[str, str]) -> None:
        """Read, add my tag to the list and 1 to the counter, write back under If-Match; retry on 412."""
        for _ in range(MAX_ATTEMPTS):
            current = await race.send("GET", url, headers=headers)
            assert current.status_code == 200, current.text
            body = current.json()
            assert current.headers["etag"] == f'"v{body["version"]}"'
            patch = {"tags": [*body["tags"], f"client-{i}"], "attributes": {counter: body["attributes"][counter] + 1}}
            written = await race.send("PATCH", url, json=patch,
                                      headers={**headers, "If-Match": current.headers["etag"]})
            if written.status_code == 200:
                assert written.json()["version"] > body["version"]
                return
            assert written.status_code == 412, written.text
            assert written.headers["content-type"] == "application/problem+json"
            assert written.json()["current_version"] > body["version"]
            conflicts[i] += 1
            await asyncio.sleep(random.uniform(0, 0.005 * min(conflicts[i], 20)))  # noqa: S311 (jitter)
        pytest.fail(f"client {i} never got its write in after {MAX_ATTEMPTS} attempts")

    started = time.monotonic()
    await asyncio.gather(*(client(i, headers) for i, headers in enumerate(client_tokens())))
    print(f"{CLIENTS} clients, {sum(conflicts)} stale writes (412) retried, {time.monotonic() - started:.1f} s")

    final = await race.send("GET", url)
    body = final.json()
    assert sorted(body["tags"]) == sorted(f"client-{i}" for i in range(CLIENTS))   # every effect present
    assert body["attributes"][counter] == CLIENTS                                   # no increment lost
    assert body["version"] == start_version + CLIENTS                                # one version per write
    assert final.headers["etag"] == f'"v{start_version + CLIENTS}"'
    assert sum(conflicts) > 0, "the clients never raced: this test proves nothing"
    writes = await race.db.fetchrow(
        "SELECT (SELECT count(*) FROM contact_history WHERE contact_id = $1 AND field = $2"
        "        AND subject LIKE 'client-%') AS history,"
        " (SELECT count(*) FROM outbox_message WHERE contact_id = $1 AND topic = 'contact.updated') AS news",
        uuid.UUID(contact_id), f"attributes.{counter}")
    assert (writes["history"], writes["news"]) == (CLIENTS, CLIENTS)
    race.assert_no_server_error()


async def test_a_stale_etag_is_refused_and_changes_nothing(race: Race) -> None:
    created = await race.send("POST", "/v1/contacts", json={"email": unique_email()})
    contact_id = created.json()["id"]
    first = await race.send("PATCH", f"/v1/contacts/{contact_id}", json={"job_title": "Buyer"},
                            headers={**ADMIN, "If-Match": created.headers["etag"]})
    assert first.status_code == 200
    stale = await race.send("PATCH", f"/v1/contacts/{contact_id}", json={"job_title": "Owner"},
                            headers={**ADMIN, "If-Match": created.headers["etag"]})
    assert stale.status_code == 412
    assert stale.json()["current_version"] == first.json()["version"]
    assert (await race.send("GET", f"/v1/contacts/{contact_id}")).json()["job_title"] == "Buyer"
