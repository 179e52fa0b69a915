"""Sync drill (ARCHITECTURE.md "Reliability bars"): the vendor down, the worker killed, PostgreSQL restarted.

A private PostgreSQL cluster, a live `carnet serve` (API only) and `carnet worker` processes against it, the
spec-checking fake Mailchimp on loopback. 10,000 list changes go through the API while the vendor refuses
connections for 60 s; once it is back, every change must be delivered within 60 s, and the fake's final
state must equal Carnet's (0 lost). Then more changes while the worker is SIGKILLed mid-run and restarted,
and while PostgreSQL is restarted under the worker: still 0 lost, and never a spec violation.

The same three faults for orders (issue 20): a shop of `SHOP` buyers pushing orders to a Brevo and a Mailchimp
destination (`push_orders`). Every order must reach both vendors in its final status (Brevo's `status`,
Mailchimp's financial and fulfillment status), never before its products, with 0 dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.security import Role
from tests.auth import TEST_SECRET, bearer
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp, subscriber_hash
from tests.fakes.server import LiveServer as FakeServer
from tests.faults.harness import LiveServer, PgCluster, WorkerProcess, private_cluster

pytestmark = pytest.mark.fault

CONTACTS = 2500                 # x 4 list changes = 10,000
DOWN_SECONDS = float(os.environ.get("DRILL_DOWN_SECONDS", "60"))
DELIVERED_WITHIN = 60.0
ADMIN = bearer(Role.ADMIN, subject="sync-drill@shop.example")
MC_KEY = f"{uuid.uuid4().hex}-us6"
REMOTE = ("mc-a", "mc-b", "mc-c")
SHOP = 1000                     # buyers, one order each, every order changed three times
SHOP_MC_KEY = f"{uuid.uuid4().hex}-us6"
SHOP_BREVO_KEY = f"xkeysib-{uuid.uuid4().hex}"
STORE = "drill-store"
# Carnet's status -> Mailchimp's (financial_status, fulfillment_status) (docs/sync.md, "What goes where").
MAILCHIMP_STATUS = {"placed": ("pending", None), "paid": ("paid", None), "shipped": ("paid", "shipped"),
                    "cancelled": ("cancelled", None)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with private_cluster("carnet-sync-drill-pg-", "carnet_sync") as pg:
        yield pg


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="carnet-sync-drill-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def api(cluster: PgCluster, workdir: Path) -> Iterator[LiveServer]:
    server = LiveServer(workdir, cluster.url_for("carnet_sync"), TEST_SECRET, RUN_WORKER_IN_API="false")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vendor() -> Iterator[tuple[FakeMailchimp, FakeServer]]:
    fake = FakeMailchimp(api_key=MC_KEY, lists=set(REMOTE))
    fake.delay = 0.05
    server = FakeServer(fake).start()
    try:
        yield fake, server
    finally:
        server.stop()
    assert fake.violations == []


async def _seed(http: httpx.AsyncClient, db_url: str, fake_url: str) -> tuple[list[str], list[str]]:
    """Lists, the destination, and CONTACTS contacts with an email_marketing grant each."""
    lists = []
    for name in ("a", "b", "c"):
        response = await http.post("/v1/lists", json={"name": f"drill-{name}"}, headers=ADMIN)
        assert response.status_code == 201, response.text
        lists.append(response.json()["id"])
    response = await http.post("/v1/destinations", headers=ADMIN, json={
        "kind": "mailchimp", "name": "drill", "config": {"api_key": MC_KEY, "base_url": fake_url},
        "list_mappings": [{"list_id": i, "remote_list_id": r} for i, r in zip(lists, REMOTE, strict=True)]})
    assert response.status_code == 201, response.text
    ids: list[str] = []
    for start in range(0, CONTACTS, 1000):
        items = [{"email": f"drill-{i}@shop.example", "first_name": f"D{i}"}
                 for i in range(start, min(start + 1000, CONTACTS))]
        response = await http.post("/v1/contacts/batch", json={"items": items}, headers=ADMIN)
        assert response.status_code == 200, response.text
        ids += [r["id"] for r in response.json()["results"]]
    conn = await asyncpg.connect(db_url)
    try:  # the grants themselves are not under test here: one statement
        await conn.execute("""
            INSERT INTO consent_event (contact_id, purpose, action, source, occurred_at, recorded_at, recorded_by,
                                       proof)
            SELECT id, 'email_marketing', 'granted', 'drill', now() - interval '1 day', now(), 'drill',
                   '{"wording": "yes"}'::jsonb
            FROM contact""")
    finally:
        await conn.close()
    return lists, ids


async def _batch(http: httpx.AsyncClient, list_id: str, *, add: list[str] | None = None,
                 remove: list[str] | None = None) -> None:
    add, remove = add or [], remove or []
    for start in range(0, max(len(add), len(remove)), 1000):
        body = {"add": list(add[start:start + 1000]), "remove": list(remove[start:start + 1000])}
        response = await http.post(f"/v1/lists/{list_id}/members/batch", json=body, headers=ADMIN)
        assert response.status_code == 200, response.text


async def _undelivered(db_url: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        pending = await conn.fetchval("SELECT count(*) FROM delivery WHERE status IN ('pending', 'in_flight')")
        undispatched = await conn.fetchval("SELECT count(*) FROM outbox_message WHERE dispatched_at IS NULL")
        dead = await conn.fetchval("SELECT count(*) FROM delivery WHERE status = 'dead'")
        assert dead == 0
        return int(pending) + int(undispatched)
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def _wait_delivered(db_url: str, *, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            if await _undelivered(db_url) == 0:
                return time.monotonic() - start
        await asyncio.sleep(0.5)
    raise AssertionError(f"not delivered within {within} s ({await _undelivered(db_url)} left)")


async def _wait_in_flight(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        async with asyncio.timeout(30):
            while not await conn.fetchval("SELECT count(*) FROM delivery WHERE status = 'in_flight'"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def _carnet_state(db_url: str) -> dict[tuple[str, str], str]:
    """(remote list, subscriber hash) -> status, from Carnet's memberships of the mapped lists."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("""
            SELECT c.email, l.name, m.status FROM list_membership m JOIN contact c ON c.id = m.contact_id
            JOIN list l ON l.id = m.list_id""")
    finally:
        await conn.close()
    remote = {"drill-a": "mc-a", "drill-b": "mc-b", "drill-c": "mc-c"}
    return {(remote[r["name"]], subscriber_hash(r["email"])): r["status"] for r in rows}


def _remote_state(fake: FakeMailchimp) -> dict[tuple[str, str], str]:
    return {(list_id, key): member.status for list_id, members in fake.lists.items()
            for key, member in members.items()}


async def test_vendor_down_worker_killed_database_restarted(
    cluster: PgCluster, api: LiveServer, workdir: Path, vendor: tuple[FakeMailchimp, FakeServer]
) -> None:
    fake, fake_server = vendor
    db_url = cluster.url_for("carnet_sync")
    report: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        lists, ids = await _seed(http, db_url, fake_server.url)
        worker = WorkerProcess(workdir, db_url).start()
        try:
            # 1. The vendor refuses connections; 10,000 list changes are made meanwhile.
            fake_server.stop()
            down_at = time.monotonic()
            for list_id in lists:
                await _batch(http, list_id, add=ids)
            await _batch(http, lists[1], remove=ids)
            report["changes_made_s"] = round(time.monotonic() - down_at, 1)
            await asyncio.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_at)))
            fake_server.start()
            report["delivered_after_recovery_s"] = round(await _wait_delivered(db_url, within=DELIVERED_WITHIN), 1)
            assert _remote_state(fake) == await _carnet_state(db_url)

            # 2. More changes; the worker is SIGKILLed mid-run and a new one takes over after the lease.
            fake.delay = 2.0  # a slow vendor: the kill lands while batches are in flight
            await _batch(http, lists[0], remove=ids[:1000])
            await _wait_in_flight(db_url)
            worker.kill()
            fake.delay = 0.05
            worker = WorkerProcess(workdir, db_url).start()
            report["delivered_after_kill_s"] = round(await _wait_delivered(db_url, within=120), 1)
            assert _remote_state(fake) == await _carnet_state(db_url)

            # 3. More changes; PostgreSQL restarts under the worker (fast shutdown: sessions are cut).
            fake.delay = 2.0
            await _batch(http, lists[2], remove=ids[:1500])
            await _wait_in_flight(db_url)
            cluster.stop("fast")
            fake.delay = 0.05
            await asyncio.sleep(3.0)
            cluster.start()
            report["delivered_after_db_restart_s"] = round(await _wait_delivered(db_url, within=120), 1)
            assert _remote_state(fake) == await _carnet_state(db_url)
        finally:
            worker.stop()
    assert fake.violations == []
    report["vendor_requests"] = len(fake.seen)
    print("sync drill:", report)


# -- orders (issue 20) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shops() -> Iterator[tuple[FakeBrevo, FakeServer, FakeMailchimp, FakeServer]]:
    brevo = FakeBrevo(api_key=SHOP_BREVO_KEY, lists={7}, rate_limit=10)
    mailchimp = FakeMailchimp(api_key=SHOP_MC_KEY, lists={"mc-shop"})
    brevo.delay = mailchimp.delay = 0.05
    brevo_server, mailchimp_server = FakeServer(brevo).start(), FakeServer(mailchimp).start()
    try:
        yield brevo, brevo_server, mailchimp, mailchimp_server
    finally:
        brevo_server.stop()
        mailchimp_server.stop()
    assert brevo.violations == [] and mailchimp.violations == []


async def _seed_shop(http: httpx.AsyncClient, db_url: str, brevo: FakeBrevo, brevo_url: str,
                     mailchimp_url: str) -> list[str]:
    """SHOP buyers on one list mapped to both vendors, each with a grant, already at the vendors as in a shop's
    steady state: the outbox messages of their creation are marked dispatched and Brevo holds them (their sync
    links written here), else 1,000 first profile writes at Brevo's 10/s would be the drill, not the orders."""
    response = await http.post("/v1/lists", json={"name": "drill-shop"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    shop_list = response.json()["id"]
    brevo_id = await _destination(http, "brevo", {"api_key": SHOP_BREVO_KEY, "base_url": brevo_url,
                                                  "push_orders": True}, shop_list, "7")
    await _destination(http, "mailchimp", {"api_key": SHOP_MC_KEY, "base_url": mailchimp_url, "store_id": STORE,
                                           "store_currency": "EUR", "push_orders": True}, shop_list, "mc-shop")
    ids: list[str] = []
    for start in range(0, SHOP, 1000):
        items = [{"email": f"buyer-{i}@shop.example"} for i in range(start, min(start + 1000, SHOP))]
        response = await http.post("/v1/contacts/batch", json={"items": items}, headers=ADMIN)
        assert response.status_code == 200, response.text
        ids += [r["id"] for r in response.json()["results"]]
    brevo.seed([f"buyer-{i}@shop.example" for i in range(SHOP)])     # Brevo ids 1..SHOP, in this order
    conn = await asyncpg.connect(db_url)
    try:  # the grant first: a list add without one is refused item by item
        await conn.execute("""
            INSERT INTO consent_event (contact_id, purpose, action, source, occurred_at, recorded_at, recorded_by,
                                       proof)
            SELECT id, 'email_marketing', 'granted', 'drill', now() - interval '1 day', now(), 'drill',
                   '{"wording": "yes"}'::jsonb
            FROM contact WHERE email LIKE 'buyer-%'""")
        await _batch(http, shop_list, add=ids)
        await conn.execute("UPDATE outbox_message SET dispatched_at = now() WHERE dispatched_at IS NULL")
        await conn.executemany("INSERT INTO sync_link (destination_id, contact_id, remote_ref, synced_at) "
                               "VALUES ($1, $2, $3, now())",
                               [(uuid.UUID(brevo_id), uuid.UUID(c), str(n)) for n, c in enumerate(ids, 1)])
        members = await conn.fetchval("SELECT count(*) FROM list_membership WHERE list_id = $1 AND status = "
                                      "'subscribed'", uuid.UUID(shop_list))
        assert members == SHOP
    finally:
        await conn.close()
    return ids


async def _destination(http: httpx.AsyncClient, kind: str, config: dict[str, Any], list_id: str,
                       remote: str) -> str:
    response = await http.post("/v1/destinations", headers=ADMIN, json={
        "kind": kind, "name": f"drill-shop-{kind}", "config": config,
        "list_mappings": [{"list_id": list_id, "remote_list_id": remote}]})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _orders(http: httpx.AsyncClient, buyers: list[str], status: str, numbers: range | None = None) -> None:
    """The order of each buyer numbered here (`DRILL-<n>`, all by default) put with this status, eight at a time."""
    gate = asyncio.Semaphore(8)
    lines = [{"sku": f"SKU-{k}", "name": f"Item {k}", "category": "drill", "quantity": 1, "unit_price": "12.00"}
             for k in range(3)]

    async def put(n: int, buyer: str) -> None:
        async with gate:
            response = await http.put(f"/v1/orders/DRILL-{n}", headers=ADMIN, json={
                "contact": {"id": buyer}, "placed_at": "2026-12-01T10:00:00+01:00", "status": status,
                "currency": "EUR", "total_amount": "36.00", "items": lines})
            assert response.status_code in (200, 201), response.text

    await asyncio.gather(*(put(n, buyers[n]) for n in numbers or range(len(buyers))))


async def _carnet_orders(db_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("""SELECT external_id, status FROM "order" WHERE external_id LIKE 'DRILL-%'""")
    finally:
        await conn.close()
    return {r["external_id"]: r["status"] for r in rows}


async def _assert_orders_at_both(db_url: str, brevo: FakeBrevo, mailchimp: FakeMailchimp) -> None:
    """Every order at each vendor in its final status, none before its products."""
    carnet = await _carnet_orders(db_url)
    assert len(carnet) == SHOP
    assert {i: o["status"] for i, o in brevo.orders.items()} == carnet
    assert brevo.orders_before_products == []
    assert STORE in mailchimp.stores, str(await _destinations(db_url))
    held = mailchimp.stores[STORE].orders
    assert {i: (o.get("financial_status"), o.get("fulfillment_status")) for i, o in held.items()} == {
        i: MAILCHIMP_STATUS[s] for i, s in carnet.items()}


async def _destinations(db_url: str) -> list[dict[str, Any]]:
    """Each destination's state and deliveries (what an assertion shows when a vendor got nothing)."""
    conn = await asyncpg.connect(db_url)
    try:
        return [dict(r) for r in await conn.fetch("""
            SELECT d.kind, d.enabled, d.last_error, d.disabled_reason, d.config::text, d.list_mappings::text, x.status,
                   count(x.id) AS deliveries
            FROM destination d LEFT JOIN delivery x ON x.destination_id = d.id
            GROUP BY 1, 2, 3, 4, 5, 6, 7""")]
    finally:
        await conn.close()


async def test_orders_survive_vendor_down_worker_killed_database_restarted(
    cluster: PgCluster, api: LiveServer, workdir: Path,
    shops: tuple[FakeBrevo, FakeServer, FakeMailchimp, FakeServer],
) -> None:
    brevo, brevo_server, mailchimp, mailchimp_server = shops
    db_url = cluster.url_for("carnet_sync")
    report: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        buyers = await _seed_shop(http, db_url, brevo, brevo_server.url, mailchimp_server.url)
        half = len(buyers) // 2
        worker = WorkerProcess(workdir, db_url).start()
        try:
            # 1. Both vendors refuse connections while every order is placed, then paid.
            brevo_server.stop()
            mailchimp_server.stop()
            down_at = time.monotonic()
            await _orders(http, buyers, "placed")
            await _orders(http, buyers, "paid")
            report["orders_made_s"] = round(time.monotonic() - down_at, 1)
            await asyncio.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_at)))
            brevo_server.start()
            mailchimp_server.start()
            report["delivered_after_recovery_s"] = round(await _wait_delivered(db_url, within=DELIVERED_WITHIN), 1)
            await _assert_orders_at_both(db_url, brevo, mailchimp)

            # 2. Half of them shipped; the worker is SIGKILLed with batches in flight.
            brevo.delay = mailchimp.delay = 2.0
            await _orders(http, buyers, "shipped", range(half))
            await _wait_in_flight(db_url)
            worker.kill()
            brevo.delay = mailchimp.delay = 0.05
            worker = WorkerProcess(workdir, db_url).start()
            report["delivered_after_kill_s"] = round(await _wait_delivered(db_url, within=120), 1)
            await _assert_orders_at_both(db_url, brevo, mailchimp)

            # 3. The other half cancelled; PostgreSQL restarts under the worker.
            brevo.delay = mailchimp.delay = 2.0
            await _orders(http, buyers, "cancelled", range(half, len(buyers)))
            await _wait_in_flight(db_url)
            cluster.stop("fast")
            brevo.delay = mailchimp.delay = 0.05
            await asyncio.sleep(3.0)
            cluster.start()
            report["delivered_after_db_restart_s"] = round(await _wait_delivered(db_url, within=120), 1)
            await _assert_orders_at_both(db_url, brevo, mailchimp)
        finally:
            worker.stop()
    assert brevo.violations == [] and mailchimp.violations == []
    report["brevo_requests"], report["brevo_429"] = len(brevo.seen), brevo.over_limit
    report["mailchimp_requests"], report["mailchimp_429"] = len(mailchimp.seen), mailchimp.over_limit
    print("orders drill:", report)
