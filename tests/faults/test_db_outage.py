"""Database outage drill (ARCHITECTURE.md "Reliability bars"): not in the default run; `bin/fault` runs it.

A private PostgreSQL cluster (never the machine's shared server) and a live `carnet serve` against it.
Under a steady mix of reads and writes, PostgreSQL is stopped for ~10 s (a fast shutdown, then a crash:
`pg_ctl stop -m immediate`): every request
answered during the outage must be a 503 problem+json with Retry-After, none a 500, none slow; once
PostgreSQL is back, the same server process must answer 2xx again within a few seconds by itself.
Then the pool is exhausted on purpose (pool of 1, a request held on a row lock): the next request is a
503 after DATABASE_POOL_TIMEOUT, not a hang, and the server serves again as soon as the lock goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.security import Role
from tests.auth import TEST_SECRET, bearer
from tests.factories import PROOF
from tests.faults.harness import LiveServer, PgCluster, private_cluster

pytestmark = pytest.mark.fault

OUTAGE_SECONDS = 10.0
SLOW_SECONDS = 3.0      # no answer may take longer, outage or not ("never a hang past a few seconds")
RECOVERY_SECONDS = 5.0  # first 2xx after PostgreSQL is back, without touching the server
WORKERS = int(os.environ.get("DRILL_WORKERS", "8"))  # concurrent clients
ADMIN = bearer(Role.ADMIN, subject="drill@shop.example")


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with private_cluster("carnet-drill-pg-", "carnet_outage", "carnet_pool") as pg:
        yield pg


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="carnet-drill-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def live_server(workdir: Path, database_url: str, **env: str) -> Iterator[LiveServer]:
    server = LiveServer(workdir, database_url, TEST_SECRET, **env)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---- the load -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    op: str
    started: float
    ended: float
    status: int | None  # None: the request itself failed (connection error, client timeout)
    content_type: str
    retry_after: str | None
    problem_status: int | None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Fixtures:
    contacts: list[dict[str, Any]]
    list_id: str
    segment_id: str


Op = Callable[[httpx.AsyncClient, Fixtures, random.Random], Awaitable[httpx.Response]]


async def _read(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    return await http.get(f"/v1/contacts/{rng.choice(fx.contacts)['id']}")


async def _search(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    return await http.get("/v1/contacts", params={"limit": 10})


async def _upsert(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    if rng.random() < 0.5:
        c = rng.choice(fx.contacts)
        body = {"external_id": c["external_id"], "email": c["email"], "first_name": f"F{rng.randrange(1000)}"}
    else:
        key = uuid.uuid4().hex[:12]
        body = {"external_id": f"drill-{key}", "email": f"drill-{key}@example.com", "first_name": "New"}
    return await http.post("/v1/contacts/upsert", json=body)


async def _patch(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    body = {"address": {"city": f"City {rng.randrange(50)}"}}
    return await http.patch(f"/v1/contacts/{rng.choice(fx.contacts)['id']}", json=body)


async def _order(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    body = {"contact": {"email": rng.choice(fx.contacts)["email"]}, "placed_at": datetime.now(UTC).isoformat(),
            "status": "paid", "currency": "EUR", "total_amount": "49.90",
            "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "49.90"}]}
    return await http.put(f"/v1/orders/drill-{uuid.uuid4().hex[:12]}", json=body)


async def _segment_count(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    return await http.get(f"/v1/segments/{fx.segment_id}/count")


async def _subscribe(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    contact = rng.choice(fx.contacts)
    return await http.put(f"/v1/lists/{fx.list_id}/members/{contact['id']}", json={"consent": {"proof": PROOF}})


async def _ready(http: httpx.AsyncClient, fx: Fixtures, rng: random.Random) -> httpx.Response:
    return await http.get("/readyz")


OPS: dict[str, Op] = {"read": _read, "search": _search, "upsert": _upsert, "patch": _patch, "order": _order,
                      "segment_count": _segment_count, "subscribe": _subscribe, "readyz": _ready}


async def _seed(http: httpx.AsyncClient) -> Fixtures:
    contacts = []
    for i in range(30):
        key = f"seed-{i:03d}-{uuid.uuid4().hex[:6]}"
        response = await http.post("/v1/contacts", json={"external_id": key, "email": f"{key}@example.com",
                                                         "address": {"city": "Lyon" if i % 2 else "Paris"}})
        assert response.status_code == 201, response.text
        contacts.append(response.json())
    made = await http.post("/v1/lists", json={"name": f"drill-{uuid.uuid4().hex[:8]}"})
    assert made.status_code == 201, made.text
    lyon = {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"}]}
    segment = await http.post("/v1/segments", json={"name": f"drill-{uuid.uuid4().hex[:8]}", "filter": lyon})
    assert segment.status_code == 201, segment.text
    return Fixtures(contacts, made.json()["id"], segment.json()["id"])


async def _call(http: httpx.AsyncClient, op: str, fx: Fixtures, rng: random.Random) -> Sample:
    started = time.monotonic()
    try:
        response = await OPS[op](http, fx, rng)
    except httpx.HTTPError as exc:
        return Sample(op, started, time.monotonic(), None, "", None, None, error=type(exc).__name__)
    ended = time.monotonic()
    ctype = response.headers.get("content-type", "")
    problem_status = None
    if ctype.startswith("application/problem+json"):
        with contextlib.suppress(ValueError):
            problem_status = response.json().get("status")
    return Sample(op, started, ended, response.status_code, ctype, response.headers.get("retry-after"), problem_status)


async def _drive(http: httpx.AsyncClient, fx: Fixtures, stop: asyncio.Event, samples: list[Sample], seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 (a request mix, not a secret)
    names = list(OPS)
    while not stop.is_set():
        samples.append(await _call(http, rng.choice(names), fx, rng))
        await asyncio.sleep(0.01)  # a steady stream, not a flood: the drill is about behaviour, not speed


def _describe(samples: list[Sample]) -> str:
    return ", ".join(f"{op} {status}×{n}" for (op, status), n in
                     sorted(Counter((s.op, s.status if s.status else s.error) for s in samples).items(), key=str))


# ---- the drill ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_outage_answers_503_then_recovers_by_itself(cluster: PgCluster, workdir: Path, mode: str) -> None:
    """`fast`: an orderly stop (sessions terminated); `immediate`: a crash (no goodbye, crash recovery at start)."""
    with live_server(workdir, cluster.url_for("carnet_outage")) as server:
        limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
        async with httpx.AsyncClient(base_url=server.base_url, headers=ADMIN, timeout=15, limits=limits) as http:
            fx = await _seed(http)
            samples: list[Sample] = []
            stop = asyncio.Event()
            drivers = [asyncio.create_task(_drive(http, fx, stop, samples, seed)) for seed in range(WORKERS)]
            try:
                await asyncio.sleep(3)
                await asyncio.to_thread(cluster.stop, mode)
                down = time.monotonic()
                await asyncio.sleep(OUTAGE_SECONDS)
                restarting = time.monotonic()
                await asyncio.to_thread(cluster.start)
                up = time.monotonic()
                await asyncio.sleep(RECOVERY_SECONDS + 5)
            finally:
                stop.set()
                await asyncio.gather(*drivers)
        assert server.alive(), "the server process died"  # and it was never restarted: recovery is its own
        crashes = server.log_lines("request.crashed")

    before = [s for s in samples if s.ended < down - 0.5]
    during = [s for s in samples if s.started >= down and s.ended <= restarting]
    after = [s for s in samples if s.started >= up + RECOVERY_SECONDS]
    first_ok = min((s.ended for s in samples if s.started >= up and s.status and s.status < 300), default=None)

    # Never a 500, never a dropped connection, never a hang.
    broken = [s for s in samples if s.status is None or (s.status >= 500 and s.status != 503)]
    assert not broken, f"failed or 5xx other than 503: {_describe(broken)}\n" + "\n".join(crashes)
    slow = [s for s in samples if s.seconds > SLOW_SECONDS]
    assert not slow, f"slower than {SLOW_SECONDS} s: " + ", ".join(f"{s.op} {s.seconds:.1f}s" for s in slow)

    assert before and all(s.status and s.status < 300 for s in before), f"before the outage: {_describe(before)}"

    # During the outage: 503 problem+json with Retry-After, every time, on every operation.
    assert len(during) >= 50, f"too few requests during the outage ({len(during)}) to judge"
    assert {s.op for s in during} == set(OPS), f"not every operation ran during the outage: {_describe(during)}"
    wrong = [s for s in during
             if s.status != 503 or not s.content_type.startswith("application/problem+json")
             or s.problem_status != 503 or not (s.retry_after or "").isdigit()]
    assert not wrong, f"during the outage: {_describe(wrong)}"

    # Recovery by itself: the same process, 2xx again within a few seconds, then nothing but 2xx.
    assert first_ok is not None and first_ok - up <= RECOVERY_SECONDS, (
        f"no 2xx within {RECOVERY_SECONDS} s of PostgreSQL's return (first at {first_ok and first_ok - up})")
    assert len(after) >= 50 and all(s.status and s.status < 300 for s in after), f"after recovery: {_describe(after)}"
    print(f"\ndrill ({mode}): {len(samples)} requests; before {len(before)}, during {len(during)} (all 503), "
          f"after {len(after)}; first 2xx {first_ok - up:.2f} s after PostgreSQL was back; "
          f"slowest {max(s.seconds for s in samples):.2f} s")


async def test_quick_restart_costs_at_most_one_503(cluster: PgCluster, workdir: Path) -> None:
    """PostgreSQL restarts between two requests: the pool is full of dead connections nobody has seen die.

    The first request to meet one answers 503 (never 500: the single-statement read path runs on the bare
    asyncpg connection, which SQLAlchemy does not watch); it recycles every connection of that generation,
    so the requests after it succeed.
    """
    with live_server(workdir, cluster.url_for("carnet_outage")) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=ADMIN, timeout=15) as http:
            fx = await _seed(http)
            rng = random.Random(1)  # noqa: S311 (a request mix, not a secret)
            warm = await asyncio.gather(*(_read(http, fx, rng) for _ in range(30)))  # several pooled connections
            assert all(r.status_code == 200 for r in warm)
            await asyncio.to_thread(cluster.stop, "fast")
            await asyncio.to_thread(cluster.start)
            # Let the revocation listener reconnect (1 s back-off): until it does, each request checks
            # revocation through a session, and that path would meet (and flush) the dead connections first.
            await asyncio.sleep(3)
            statuses = []
            for i in range(20):
                response = await (_read if i % 2 == 0 else _search)(http, fx, rng)
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert response.headers["retry-after"].isdigit(), response.headers
    assert 500 not in statuses and statuses.count(503) <= 1 and set(statuses[2:]) == {200}, statuses


async def test_pool_exhaustion_answers_503(cluster: PgCluster, workdir: Path) -> None:
    pool_timeout = 1.0
    # A pool of 2 (the smallest that leaves a connection beside the one costly-read slot, checked at boot),
    # both held by PATCHes waiting on a row lock.
    with live_server(workdir, cluster.url_for("carnet_pool"), DATABASE_POOL_SIZE="2",
                     COSTLY_READS_PER_PROCESS="1", DATABASE_POOL_TIMEOUT=str(pool_timeout)) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=ADMIN, timeout=30) as http:
            ids = []
            for _ in range(2):
                made = await http.post("/v1/contacts", json={"email": f"{uuid.uuid4().hex[:8]}@example.com"})
                assert made.status_code == 201, made.text
                ids.append(made.json()["id"])
            contact_id = ids[0]
            locker = await asyncpg.connect(cluster.url_for("carnet_pool"), timeout=10)
            try:
                # Another client holds two contacts' rows: a PATCH of each waits on it, holding both pooled
                # connections.
                held = locker.transaction()
                await held.start()
                await locker.execute("SELECT 1 FROM contact WHERE id = ANY($1::uuid[]) FOR UPDATE",
                                     [uuid.UUID(i) for i in ids])
                nantes = {"address": {"city": "Nantes"}}
                patches = [asyncio.create_task(http.patch(f"/v1/contacts/{i}", json=nantes)) for i in ids]
                await _wait_for_lock_waiters(locker, 2)

                started = time.monotonic()
                starved = await http.get(f"/v1/contacts/{contact_id}")
                waited = time.monotonic() - started
                assert starved.status_code == 503, starved.text
                assert starved.headers["content-type"].startswith("application/problem+json")
                assert starved.json()["status"] == 503 and starved.headers["retry-after"].isdigit()
                assert pool_timeout * 0.9 <= waited <= pool_timeout + 2, f"answered after {waited:.2f} s"
                assert not any(patch.done() for patch in patches)

                await held.rollback()
                for patched in await asyncio.gather(*patches):
                    assert patched.status_code == 200, patched.text
            finally:
                await locker.close()
            again = await http.get(f"/v1/contacts/{contact_id}")
            assert again.status_code == 200 and again.json()["address"]["city"] == "Nantes", again.text


async def _wait_for_lock_waiters(conn: asyncpg.Connection, count: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # The locker is inside its transaction, where pg_stat_activity is read once and cached: look again.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'carnet' AND wait_event_type = 'Lock'")
        if waiting >= count:
            return
        await asyncio.sleep(0.05)
    activity = await conn.fetch("SELECT application_name, state, wait_event_type, wait_event, left(query, 80) AS q"
                                " FROM pg_stat_activity WHERE datname = current_database()")
    raise AssertionError(f"fewer than {count} PATCHes waited on the row lock: {[dict(r) for r in activity]}")
