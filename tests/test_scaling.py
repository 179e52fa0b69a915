"""Beyond one process (docs/scaling.md): 2 API processes and 2 workers on one PostgreSQL (~50 s, in CI).

Clients spread over both APIs write the same contacts concurrently (If-Match read-modify-write), subscribe
and unsubscribe them, while both workers deliver to a webhook receiver (one delivery per event) and to the
fake Mailchimp (state). Invariants checked at the end:
  - no lost write: every acknowledged increment is in the final record, and its version counts them all;
  - no duplicate delivery: every outbox message reached the receiver exactly once (no failure was injected,
    so at-least-once must be exactly once), each signed;
  - per-contact order: each contact's events arrived in the order they were written;
  - the vendor's final state equals Carnet's, with 0 spec violations.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.security import Role
from tests.auth import TEST_SECRET, bearer
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp, subscriber_hash
from tests.fakes.server import LiveServer as FakeServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.faults.harness import LiveServer, PgCluster, WorkerProcess, private_cluster

CONTACTS = 40
CLIENTS = 16
ROUNDS = 12          # increments per client
ADMIN = bearer(Role.ADMIN, subject="scale@shop.example")
MC_KEY = f"{uuid.uuid4().hex}-us6"
BREVO_KEY = "xkeysib-" + uuid.uuid4().hex
SPLIT_CONTACTS = 200


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with private_cluster("carnet-scale-pg-", "carnet_scale") as pg:
        yield pg


async def _bump(http: httpx.AsyncClient, contact_id: str, client_no: int) -> int:
    """Read-modify-write of a counter attribute with If-Match; retries on 412. Returns the retries."""
    retries = 0
    while True:
        current = await http.get(f"/v1/contacts/{contact_id}", headers=ADMIN)
        assert current.status_code == 200, current.text
        attributes = current.json()["attributes"]
        patch = {"attributes": {"visits": attributes.get("visits", 0) + 1}, "first_name": f"c{client_no}"}
        response = await http.patch(f"/v1/contacts/{contact_id}", json=patch,
                                    headers={**ADMIN, "If-Match": current.headers["ETag"]})
        if response.status_code == 200:
            return retries
        assert response.status_code == 412, response.text
        retries += 1


async def test_two_apis_two_workers_keep_every_invariant(cluster: PgCluster, tmp_path: Path) -> None:
    db_url = cluster.url_for("carnet_scale")
    apis = [LiveServer(tmp_path / f"api{i}", db_url, TEST_SECRET, RUN_WORKER_IN_API="false") for i in range(2)]
    for api in apis:
        api.start()
    fake = FakeMailchimp(api_key=MC_KEY, lists={"mc-news"})
    workers: list[WorkerProcess] = []
    try:
        with FakeServer(fake) as vendor:
            clients = [httpx.AsyncClient(base_url=api.base_url, timeout=60) for api in apis]
            first = clients[0]
            response = await first.post("/v1/attributes", json={"name": "visits", "type": "number"}, headers=ADMIN)
            assert response.status_code == 201, response.text
            news = (await first.post("/v1/lists", json={"name": "news"}, headers=ADMIN)).json()
            hook = (await first.post("/v1/destinations", headers=ADMIN, json={
                "kind": "webhook", "name": "hook", "config": {"url": "http://placeholder.invalid/"}})).json()
            receiver = FakeWebhookReceiver(hook["generated_secrets"]["secret"])
            with FakeServer(receiver) as receiver_server:
                moved = await first.patch(f"/v1/destinations/{hook['id']}", headers=ADMIN, json={"config": {
                    "url": receiver_server.url + "/carnet", "secret": hook["generated_secrets"]["secret"]}})
                assert moved.status_code == 200, moved.text  # a new URL takes the secret again (docs/security.md)
                await first.post("/v1/destinations", headers=ADMIN, json={
                    "kind": "mailchimp", "name": "mc", "config": {"api_key": MC_KEY, "base_url": vendor.url},
                    "list_mappings": [{"list_id": news["id"], "remote_list_id": "mc-news"}]})
                workers = [WorkerProcess(tmp_path, db_url).start() for _ in range(2)]

                contact_ids = []
                for i in range(CONTACTS):
                    response = await clients[i % 2].post("/v1/contacts", headers=ADMIN, json={
                        "email": f"scale-{i}@shop.example", "attributes": {"visits": 0}})
                    assert response.status_code == 201, response.text
                    contact_ids.append(response.json()["id"])

                rng = random.Random(7)  # noqa: S311 (test data)
                acknowledged: dict[str, int] = defaultdict(int)

                async def client(no: int) -> int:
                    http, retries = clients[no % 2], 0
                    for _ in range(ROUNDS):
                        contact_id = rng.choice(contact_ids)
                        retries += await _bump(http, contact_id, no)
                        acknowledged[contact_id] += 1
                        if rng.random() < 0.3:  # and list changes, through either API
                            response = await http.put(f"/v1/lists/{news['id']}/members/{contact_id}",
                                                      json={"consent": {"proof": {"wording": "yes"}}},
                                                      headers=ADMIN)
                            assert response.status_code in (200, 201, 422), response.text
                    return retries

                retries = sum(await asyncio.gather(*(client(n) for n in range(CLIENTS))))
                for contact_id in contact_ids[: CONTACTS // 4]:  # some unsubscribes at the end
                    await clients[1].delete(f"/v1/lists/{news['id']}/members/{contact_id}", headers=ADMIN)

                # No lost write.
                for contact_id in contact_ids:
                    body = (await first.get(f"/v1/contacts/{contact_id}", headers=ADMIN)).json()
                    assert body["attributes"]["visits"] == acknowledged[contact_id]

                # Wait for both workers to deliver everything.
                conn = await asyncpg.connect(db_url)
                try:
                    deadline = time.monotonic() + 90
                    while time.monotonic() < deadline:
                        left = await conn.fetchval(
                            "SELECT (SELECT count(*) FROM outbox_message WHERE dispatched_at IS NULL)"
                            " + (SELECT count(*) FROM delivery WHERE status <> 'delivered')")
                        if left == 0:
                            break
                        await asyncio.sleep(0.5)
                    assert left == 0
                    messages = await conn.fetch("SELECT id, contact_id FROM outbox_message ORDER BY id")
                    members = await conn.fetch("SELECT c.email, m.status FROM list_membership m "
                                               "JOIN contact c ON c.id = m.contact_id")
                finally:
                    await conn.close()

            # Exactly once, signed, in order per contact.
            ids = [d.id for d in receiver.deliveries]
            assert all(d.valid for d in receiver.deliveries), [d.reason for d in receiver.deliveries if not d.valid]
            assert sorted(ids) == sorted(f"msg_{m['id']}" for m in messages) and len(ids) == len(set(ids))
            per_contact: dict[str, list[int]] = defaultdict(list)
            for d in receiver.deliveries:
                per_contact[d.payload["data"]["contact_id"]].append(int(d.id.removeprefix("msg_")))
            assert all(seq == sorted(seq) for seq in per_contact.values())

            # The vendor equals Carnet.
            remote = {key: m.status for key, m in fake.lists["mc-news"].items()}
            assert remote == {subscriber_hash(m["email"]): m["status"] for m in members}
            assert fake.violations == []
            print(f"scaling: {len(ids)} events exactly once, {len(members)} members equal, "
                  f"{sum(acknowledged.values())} increments kept, {retries} If-Match retries")
            for http in clients:
                await http.aclose()
    finally:
        for worker in workers:
            worker.stop()
        for api in apis:
            api.stop()


async def test_two_workers_split_a_vendor_limit(cluster: PgCluster, tmp_path: Path) -> None:
    """Brevo allows 10 requests/s per API key, not per process: two workers (small batches, so both claim)
    keep under it together, from their heartbeats, and still use most of it."""
    db_url = cluster.url_for("carnet_scale")
    api = LiveServer(tmp_path / "api", db_url, TEST_SECRET, RUN_WORKER_IN_API="false")
    api.start()
    fake = FakeBrevo(api_key=BREVO_KEY, lists={7}, rate_limit=10)
    workers: list[WorkerProcess] = []
    try:
        with FakeServer(fake) as vendor:
            async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
                news = (await http.post("/v1/lists", json={"name": "split"}, headers=ADMIN)).json()
                response = await http.post("/v1/destinations", headers=ADMIN, json={
                    "kind": "brevo", "name": "split", "config": {"api_key": BREVO_KEY, "base_url": vendor.url},
                    "list_mappings": [{"list_id": news["id"], "remote_list_id": "7"}]})
                assert response.status_code == 201, response.text
                for i in range(SPLIT_CONTACTS):
                    contact = (await http.post("/v1/contacts", json={"email": f"split-{i}@shop.example"},
                                               headers=ADMIN)).json()
                    response = await http.put(f"/v1/lists/{news['id']}/members/{contact['id']}", headers=ADMIN,
                                              json={"consent": {"proof": {"wording": "yes"}}})
                    assert response.status_code == 201, response.text
            workers = [WorkerProcess(tmp_path, db_url) for _ in range(2)]
            for worker in workers:
                worker.env["DELIVERY_BATCH_SIZE"] = "10"
                worker.start()
            started = time.monotonic()
            deadline = started + 120
            while len(fake.members(7)) < SPLIT_CONTACTS and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            took = time.monotonic() - started
    finally:
        for worker in workers:
            worker.stop()
        api.stop()
    assert len(fake.members(7)) == SPLIT_CONTACTS
    assert fake.over_limit == 0 and fake.violations == []
    arrivals = sorted(fake.arrivals())
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"split: {len(arrivals)} requests at {rate:.1f}/s by 2 workers (limit 10/s), 0 × 429; "
          f"{took:.1f} s from the workers' start")
    assert rate > 6  # both workers sent: one alone keeps 4.8/s once it has seen the other
