"""Issue 15, class 3, from the attacker's side: flood the API with reads that scan every contact.

A viewer's preview of 100 `company contains` conditions ran for as long as it took (37.7 s on 300k contacts),
and twenty of them held the whole pool: everyone else got 503. Here, against a committed database and the app's
real lifespan (its own engines and pools), each rule of the defence:

- every costly read runs under its own statement timeout, and a statement stopped by it is a 503 problem, never
  a 500 and never a hang; nothing stays behind on the pooled connections;
- one token gets 429 past its cap of costly reads in flight, while another token is served;
- costly reads of many tokens take at most their share of the pool: contact reads never wait for them;
- the interactive default covers every other statement, the fast paths' included, and a write it stops leaves
  nothing half written; bulk writes and exports have their own budgets.

Slow statements are made deterministic by a table lock held from a separate connection (a lock wait counts toward
statement_timeout exactly as work does), except the first test, which runs the real worst-case preview.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.cli import _in_transaction
from app.db import make_engine, make_sessionmaker, plain_dsn, pooled_connection, server_settings
from app.main import create_app
from app.security import Role
from app.security.costly import CostlyReadsBusy
from app.settings import ConfigurationError, Settings
from app.timeouts import StatementTimeouts, costly_connection, make_costly_engine, verify_costly_settings, within
from tests.auth import bearer
from tests.conftest import migrated_database

CONTACTS = 20_000
TEXT = "the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly past sphinx of black quartz"
# 100 distinct needles that every company holds: `all` of them must test each one on every row (no short cut).
NEEDLES = list(dict.fromkeys(TEXT[i:i + 4] for i in range(len(TEXT) - 3)))[:100]
WORST_PREVIEW = {"filter": {"all": [{"field": "company", "op": "contains", "value": n} for n in NEEDLES]}}
PROBLEMS = "https://carnet.dev/problems/"
RETRY_AFTER = {"1", "2", "3"}  # costly-reads-per-token and costly-reads-busy: drawn per answer


@pytest.fixture(scope="module")
def crowded_url(server_url: str) -> Iterator[str]:
    """A database of its own with 20,000 committed contacts (the app's lifespan builds its pools there)."""
    with migrated_database(server_url, f"carnet_costly_{os.getpid()}") as url:
        asyncio.run(_seed(url))
        yield url


async def _seed(url: str) -> None:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute("""
            INSERT INTO contact (id, email, email_status, kind, lifecycle_stage, attributes, tags, orders_count,
                                 total_spent, version, created_at, updated_at, source, company)
            SELECT gen_random_uuid(), 'flood-' || g || '@shop.example', 'unverified', 'prospect', 'prospect',
                   '{}', '{}', 0, 0, 1, now(), now(), 'api', $1 || ' ' || g
            FROM generate_series(1, $2::int) g""", TEXT, CONTACTS)
        await conn.execute("ANALYZE contact")
    finally:
        await conn.close()


@asynccontextmanager
async def serving(settings: Settings, url: str, **overrides: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings.model_copy(update={"database_url": url, "lifecycle_refresh_seconds": 0, **overrides}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
    ) as http:
        yield app, http


@asynccontextmanager
async def locked(url: str, table: str) -> AsyncIterator[asyncpg.Connection]:
    """`table` locked against every read until the block ends (the lock holder's connection is yielded)."""
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        async with conn.transaction():
            await conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
            yield conn
    finally:
        await conn.close()


async def wait_for_lock_waiters(holder: asyncpg.Connection, count: int) -> None:
    """Until `count` of the app's statements wait on a lock (the requests are in the database, holding their slots)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await holder.execute("SELECT pg_stat_clear_snapshot()")  # else the holder's transaction sees one snapshot
        waiting = await holder.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND application_name = 'carnet'")
        if waiting >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} statements waited on the lock")


async def app_backends(url: str) -> set[int]:
    """The server processes of the app's connections to this database (a dropped connection's goes away)."""
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                "AND application_name = 'carnet'")
    finally:
        await conn.close()
    return {r["pid"] for r in rows}


async def pooled_connections_are_clean(makers: async_sessionmaker[AsyncSession], size: int, expected: str) -> None:
    """Every connection of the pool, held at once: none left in a transaction, each back at the default timeout."""
    sessions = [makers() for _ in range(size)]
    try:
        for session in sessions:
            connection = await session.connection()
            raw = (await connection.get_raw_connection()).driver_connection
            assert not raw.is_in_transaction()
            assert await raw.fetchval("SHOW statement_timeout") == expected
            assert await raw.fetchval("SHOW max_parallel_workers_per_gather") != "0"
    finally:
        for session in sessions:
            await session.close()


async def asgi_get(app: FastAPI, target: str, headers: dict[str, str], *,
                   request_chunks: list[bytes] | None = None) -> tuple[int, bytes, bool]:
    """GET through the ASGI interface itself: (status, body, whether the app ended the body). httpx's transport
    refuses to hand over an answer the app did not complete, and an answer cut mid-stream is one. With
    `request_chunks`, the request has a body that never ends, and each chunk the app reads is appended there."""
    path, _, query = target.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    status, body, complete = 0, b"", False
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if request_chunks is not None:
            request_chunks.append(b"x" * 65536)
            return {"type": "http.request", "body": request_chunks[-1], "more_body": True}
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays: no disconnect (the app stops listening when it is done)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body, complete
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")
            complete = not message.get("more_body", False)

    await app(scope, receive, send)
    return status, body, complete


def problem(response: httpx.Response, slug: str, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEMS + slug and body["status"] == status
    return body


async def a_contact_id(http: httpx.AsyncClient) -> str:
    response = await http.get("/v1/contacts", params={"limit": 1}, headers=bearer(Role.VIEWER))
    assert response.status_code == 200, response.text
    return str(response.json()["data"][0]["id"])


async def a_count_url(http: httpx.AsyncClient) -> str:
    return f"/v1/segments/{await a_segment_id(http)}/count"


async def a_segment_id(http: httpx.AsyncClient) -> str:
    prospects = {"all": [{"field": "kind", "op": "eq", "value": "prospect"}]}
    body = {"name": f"flood-{uuid.uuid4().hex[:8]}", "filter": prospects}
    response = await http.post("/v1/segments", json=body, headers=bearer(Role.MANAGER))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_a_worst_case_preview_is_cut_by_the_costly_timeout_and_answered_503_not_run_to_the_end(
    crowded_url: str, settings: Settings,
) -> None:
    async with serving(settings, crowded_url, statement_timeout_costly_seconds=0.3, database_pool_size=3,
                       costly_reads_per_process=2) as (app, http):
        viewer = bearer(Role.VIEWER)
        started = time.monotonic()
        response = await http.post("/v1/segments/preview", json=WORST_PREVIEW, headers=viewer)
        elapsed = time.monotonic() - started
        body = problem(response, "statement-timeout", 503)
        assert response.headers["retry-after"] == "1"
        assert "0.3 s" in body["detail"]
        assert elapsed < 2.0  # unbounded, this preview takes seconds here (37.7 s on 300k contacts)

        # The pool is as it was: no connection left in the costly transaction or with its timeout, and a cheap
        # preview by the same token goes through.
        await pooled_connections_are_clean(app.state.sessionmaker, 3, "10s")
        cheap = {"filter": {"all": [{"field": "company", "op": "contains", "value": "quartz 17"}]}}
        small = await http.post("/v1/segments/preview", json=cheap, headers=viewer)
        assert small.status_code == 200, small.text[:300]
        assert small.json()["count"] == 1111  # 17, 170-179, 1700-1799, 17000-17999


async def test_a_count_runs_on_the_costly_pool_read_only_on_one_core_and_is_cut_by_its_timeout(
    crowded_url: str, settings: Settings,
) -> None:
    # Its own pool, whose connections open with the costly budget: the count is one round trip (no BEGIN, SET LOCAL,
    # ROLLBACK around it: docs/performance.md, "Events"), with every protection `within` gave it.
    async with serving(settings, crowded_url, statement_timeout_costly_seconds=0.3, database_pool_size=3,
                       costly_reads_per_process=2) as (app, http):
        count = f"/v1/segments/{await a_segment_id(http)}/count"
        assert (await http.get(count, headers=bearer(Role.VIEWER))).json() == {"count": CONTACTS}
        async with pooled_connection(app.state.costly_sessionmaker) as raw:
            assert await raw.fetchval("SHOW statement_timeout") == "300ms"
            assert await raw.fetchval("SHOW transaction_read_only") == "on"
            assert await raw.fetchval("SHOW max_parallel_workers_per_gather") == "0"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await raw.execute("DELETE FROM segment")
        async with locked(crowded_url, "segment"):
            started = time.monotonic()
            cut = await http.get(count, headers=bearer(Role.VIEWER))
            assert time.monotonic() - started < 2.0
        assert "0.3 s" in problem(cut, "statement-timeout", 503)["detail"]
        # nothing left behind, and the API's own pool never served it
        assert (await http.get(count, headers=bearer(Role.VIEWER))).json() == {"count": CONTACTS}
        await pooled_connections_are_clean(app.state.sessionmaker, 3, "10s")


async def test_a_costly_read_connection_opened_without_its_settings_is_guarded_by_within(
    crowded_url: str, settings: Settings,
) -> None:
    # A pooler that drops the startup parameters hands over connections with the role's defaults only: the read
    # then runs inside `within` (read-only transaction, SET LOCAL), never unprotected.
    timeouts = StatementTimeouts.from_settings(settings)
    dropped = make_engine(crowded_url, pool_size=1, statement_timeout=timeouts.interactive)
    verify_costly_settings(dropped, timeouts)
    honoured = make_costly_engine(crowded_url, timeouts, pool_size=1, pool_timeout=5)
    try:
        for engine, in_transaction in ((dropped, True), (honoured, False)):
            request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
                costly_sessionmaker=make_sessionmaker(engine), timeouts=timeouts)))
            async with costly_connection(request, kind="a test read") as raw:  # type: ignore[arg-type]
                assert raw.is_in_transaction() is in_transaction  # one round trip a read when the settings hold
                assert await raw.fetchval("SHOW transaction_read_only") == "on"
                assert await raw.fetchval("SHOW statement_timeout") == "30s"
                assert await raw.fetchval("SHOW max_parallel_workers_per_gather") == "0"
            async with costly_connection(request, kind="a test read") as raw:  # type: ignore[arg-type]
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await raw.execute("DELETE FROM segment")
    finally:
        await dropped.dispose()
        await honoured.dispose()


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "dependency"])
async def test_one_token_past_its_cap_of_costly_reads_gets_429_while_another_token_is_served(
    crowded_url: str, settings: Settings, gate: bool,
) -> None:
    # The same answers whether the slot is taken ahead of FastAPI (app.costly_gate) or by the route's dependency.
    async with serving(settings, crowded_url, costly_reads_per_token=2, costly_reads_per_process=4,
                       costly_read_gate=gate) as (_app, http):
        segment_id = await a_segment_id(http)
        contact_id = await a_contact_id(http)
        attacker, other = bearer(Role.MANAGER), bearer(Role.VIEWER)
        count = f"/v1/segments/{segment_id}/count"
        async with locked(crowded_url, "segment") as holder:
            held = [asyncio.create_task(http.get(count, headers=attacker)) for _ in range(2)]
            await wait_for_lock_waiters(holder, 2)
            # Every costly route refuses the attacker's next one at once, without touching the database.
            for method, url, body in [
                ("GET", count, None),
                ("POST", "/v1/segments/preview", WORST_PREVIEW),
                ("GET", f"/v1/segments/{segment_id}/contacts", None),
                ("GET", f"/v1/contacts?segment={segment_id}", None),
                ("GET", "/v1/contacts/duplicates", None),
                ("GET", "/v1/exports/contacts", None),
            ]:
                refused = await asyncio.wait_for(http.request(method, url, json=body, headers=attacker), 5)
                problem(refused, "costly-reads-per-token", 429)
                assert refused.headers["retry-after"] in RETRY_AFTER  # was "1": now drawn per answer
            # Its other requests go on, and another token's costly read gets a slot (it waits on the lock too).
            assert (await http.get(f"/v1/contacts/{contact_id}", headers=attacker)).status_code == 200
            served = asyncio.create_task(http.get(count, headers=other))
            await wait_for_lock_waiters(holder, 3)
        assert [(await t).json() for t in held] == [{"count": CONTACTS}] * 2
        assert (await served).json() == {"count": CONTACTS}


async def test_costly_reads_of_many_tokens_never_take_the_pool_from_contact_reads(
    crowded_url: str, settings: Settings,
) -> None:
    async with serving(settings, crowded_url, database_pool_size=4, database_pool_timeout=1.0,
                       costly_reads_per_token=2, costly_reads_per_process=2) as (_app, http):
        segment_id = await a_segment_id(http)
        contact_id = await a_contact_id(http)
        count = f"/v1/segments/{segment_id}/count"
        async with locked(crowded_url, "segment") as holder:
            flood = [asyncio.create_task(http.get(count, headers=bearer(Role.VIEWER))) for _ in range(4)]
            await wait_for_lock_waiters(holder, 2)
            # Two run (and wait on the lock); two wait for a slot, holding no connection. Reads by anyone else are
            # served from the rest of the pool, several at once, without waiting.
            reader = bearer(Role.VIEWER)
            started = time.monotonic()
            reads = await asyncio.gather(*[http.get(f"/v1/contacts/{contact_id}", headers=reader) for _ in range(4)])
            assert [r.status_code for r in reads] == [200] * 4
            assert time.monotonic() - started < 1.0
            # Past DATABASE_POOL_TIMEOUT in the queue: a clear 503, and the waiters never reached the database.
            done, _pending = await asyncio.wait(flood, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            busy = [problem(t.result(), "costly-reads-busy", 503) for t in done]
            assert busy and all(t.result().headers["retry-after"] in RETRY_AFTER for t in done)  # was "2"
        statuses = sorted([(await t).status_code for t in flood])
        assert statuses == [200, 200, 503, 503]


async def test_a_crowd_refused_together_is_told_to_come_back_at_different_times(
    crowded_url: str, settings: Settings,
) -> None:
    # Twenty tokens refused together all came back one second later, together: bursts that stalled the event loop.
    async with serving(settings, crowded_url, costly_reads_per_token=1, costly_reads_per_process=2) as (_app, http):
        crowd, count = bearer(Role.VIEWER, subject="crowd@shop.example"), await a_count_url(http)
        async with locked(crowded_url, "segment") as holder:
            held = asyncio.create_task(http.get(count, headers=crowd))
            await wait_for_lock_waiters(holder, 1)
            refused = [await http.get(count, headers=crowd) for _ in range(30)]
        assert (await held).status_code == 200
    waits = [problem(r, "costly-reads-per-token", 429) and r.headers["retry-after"] for r in refused]
    assert set(waits) <= RETRY_AFTER and len(set(waits)) > 1  # whole seconds (HTTP), spread: all alike 1 in 3**29
    busy = {CostlyReadsBusy("full").headers["Retry-After"] for _ in range(30)}
    assert busy <= RETRY_AFTER and len(busy) > 1


async def test_past_the_queue_a_costly_read_is_refused_at_once_not_after_the_pool_timeout(
    crowded_url: str, settings: Settings,
) -> None:
    # The forty waiters of a crowd were all refused together, DATABASE_POOL_TIMEOUT after they came.
    async with serving(settings, crowded_url, database_pool_size=4, database_pool_timeout=10.0,
                       costly_reads_per_process=1, costly_reads_queue=1) as (app, http):
        count = await a_count_url(http)
        async with locked(crowded_url, "segment") as holder:
            running = asyncio.create_task(http.get(count, headers=bearer(Role.VIEWER, subject="a@shop.example")))
            await wait_for_lock_waiters(holder, 1)
            waiting = asyncio.create_task(http.get(count, headers=bearer(Role.VIEWER, subject="b@shop.example")))
            while not app.state.costly_reads.queue_full:  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.01)
            started = time.monotonic()
            refused = await http.get(count, headers=bearer(Role.VIEWER, subject="c@shop.example"))
            assert time.monotonic() - started < 1.0  # not the 10 s of DATABASE_POOL_TIMEOUT
            assert "1 wait their turn" in problem(refused, "costly-reads-busy", 503)["detail"]
            assert refused.headers["retry-after"] in RETRY_AFTER
        assert [(await t).status_code for t in (running, waiting)] == [200, 200]  # the waiter got the slot in time


async def test_the_gate_refuses_before_the_body_but_never_before_the_token_revocation_and_scopes(
    crowded_url: str, settings: Settings,
) -> None:
    async with serving(settings, crowded_url, costly_reads_per_token=2, costly_reads_per_process=4) as (_app, http):
        count = await a_count_url(http)
        issued = await http.post("/v1/tokens", json={"subject": "intern@shop.example", "role": "viewer"},
                                 headers=bearer(Role.ADMIN))
        assert issued.status_code == 201, issued.text
        token, jti = issued.json()["token"], issued.json()["jti"]
        intern = {"Authorization": f"Bearer {token}"}
        async with locked(crowded_url, "segment") as holder:
            held = [asyncio.create_task(http.get(count, headers=intern)) for _ in range(2)]
            await wait_for_lock_waiters(holder, 2)
            # At its cap, the token is refused before its body is read: a body that is not even JSON gets the 429
            # (FastAPI, which parses first, answered 422), yet...
            refused = await http.post("/v1/segments/preview", content=b"{not json",
                                      headers={**intern, "Content-Type": "application/json"})
            problem(refused, "costly-reads-per-token", 429)
            # ... only once the token is checked: none, a forged signature, a token without the route's scopes
            # (a viewer has no pii:read for the duplicates page) get their 401/403, not the 429.
            problem(await http.get(count), "unauthenticated", 401)
            forged = {"Authorization": f"Bearer {token[:-4]}{'AAAA' if token[-4:] != 'AAAA' else 'BBBB'}"}
            problem(await http.get(count, headers=forged), "unauthenticated", 401)
            denied = problem(await http.get("/v1/contacts/duplicates", headers=intern), "missing-scope", 403)
            assert denied["missing_scopes"] == ["pii:read"]
            # Revoked, its next costly read is a 401 "token revoked", not a 429.
            assert (await http.delete(f"/v1/tokens/{jti}", headers=bearer(Role.ADMIN))).status_code == 200
            revoked = problem(await http.get(count, headers=intern), "unauthenticated", 401)
            assert revoked["detail"] == "token revoked"
        for t in held:  # those two were admitted before the revocation and ran
            assert (await t).status_code == 200


async def test_a_client_trickling_its_body_holds_no_costly_slot(crowded_url: str, settings: Settings) -> None:
    # The gate takes the slot before FastAPI; were it taken before the body arrived, one slow client would hold the
    # process's only slot for as long as it cared to trickle.
    async with serving(settings, crowded_url, costly_reads_per_process=1, database_pool_timeout=1.0) as (app, http):
        count = await a_count_url(http)
        # A GET's body is read neither by FastAPI nor by the gate: an endless one is not buffered, the count is served.
        read: list[bytes] = []
        status, _body, _complete = await asyncio.wait_for(
            asgi_get(app, count, bearer(Role.VIEWER), request_chunks=read), 5)
        assert (status, read) == (200, [])
        more = asyncio.Event()

        async def trickle() -> AsyncIterator[bytes]:
            yield b'{"filter": {"all": [{"field": "kind", "op": "eq", '
            await more.wait()
            yield b'"value": "prospect"}]}}'

        slow = asyncio.create_task(http.post(
            "/v1/segments/preview", content=trickle(),
            headers={**bearer(Role.VIEWER, subject="slow@shop.example"), "Content-Type": "application/json"}))
        await asyncio.sleep(0.3)
        other = await http.get(count, headers=bearer(Role.VIEWER))
        assert other.status_code == 200, other.text[:300]  # not 503 costly-reads-busy after DATABASE_POOL_TIMEOUT
        more.set()
        assert (await slow).json()["count"] == CONTACTS


async def test_the_interactive_timeout_answers_a_stuck_read_or_write_with_503_and_writes_nothing_half(
    crowded_url: str, settings: Settings,
) -> None:
    async with serving(settings, crowded_url, statement_timeout_interactive_seconds=0.3) as (app, http):
        contact_id = await a_contact_id(http)
        manager = bearer(Role.MANAGER)
        email = f"{uuid.uuid4().hex[:12]}@example.com"
        outbox = "SELECT count(*) FROM outbox_message"
        async with app.state.sessionmaker() as session:
            queued = await session.scalar(text(outbox))
        backends = await app_backends(crowded_url)
        async with locked(crowded_url, "contact"):
            started = time.monotonic()
            read = await asyncio.wait_for(http.get(f"/v1/contacts/{contact_id}", headers=manager), 5)  # fast path
            upsert = await asyncio.wait_for(http.post("/v1/contacts/upsert", json={"email": email}, headers=manager), 5)
            create = await asyncio.wait_for(http.post("/v1/contacts", json={"email": email, "first_name": "Zoé"},
                                                      headers=manager), 5)  # a transaction (history, outbox too)
            assert time.monotonic() - started < 3.0
        for response in (read, upsert, create):
            problem(response, "statement-timeout", 503)
        assert (await http.get("/v1/contacts", params={"email": email}, headers=manager)).json()["data"] == []
        async with app.state.sessionmaker() as session:  # no outbox row of the refused writes either
            assert await session.scalar(text(outbox)) == queued
        assert (await http.get(f"/v1/contacts/{contact_id}", headers=manager)).status_code == 200
        assert backends <= await app_backends(crowded_url)  # a timeout is no disconnect: no connection was dropped


async def test_an_export_stuck_behind_a_lock_is_cut_at_the_export_timeout_and_frees_its_connection(
    crowded_url: str, settings: Settings,
) -> None:
    async with serving(settings, crowded_url, statement_timeout_export_seconds=0.5, database_pool_size=3,
                       costly_reads_per_process=2) as (app, _http):
        async with locked(crowded_url, "contact"):
            started = time.monotonic()
            # prepare() reads nothing locked for JSON Lines; the COPY then waits on the lock, and is cut
            status, body, complete = await asyncio.wait_for(
                asgi_get(app, "/v1/exports/contacts?format=jsonl", bearer(Role.MANAGER)), 5)
            assert time.monotonic() - started < 3.0
        # The 200 was sent before the COPY ran: the answer ends without its last chunk, so the client sees a
        # truncated download (never a complete-looking partial file), and no contact went out.
        assert (status, body, complete) == (200, b"", False)
        await pooled_connections_are_clean(app.state.sessionmaker, 3, "10s")


async def test_bulk_writes_and_background_work_get_the_worker_budget_not_the_interactive_one(
    crowded_url: str, settings: Settings,
) -> None:
    async with serving(settings, crowded_url, statement_timeout_interactive_seconds=0.3,
                       statement_timeout_worker_seconds=30) as (app, http):
        admin = bearer(Role.ADMIN)
        tag = f"flood-{uuid.uuid4().hex[:6]}"
        assert (await http.post("/v1/tags", json={"name": tag}, headers=admin)).status_code == 201
        async with locked(crowded_url, "contact"):
            deleting = asyncio.create_task(http.delete(f"/v1/tags/{tag}", headers=admin))
            await asyncio.sleep(1.0)  # past the interactive limit, within the worker's
        assert (await deleting).status_code == 204
        async with app.state.jobs_sessionmaker() as session:  # the lifespan's background pool (lifecycle, worker)
            assert await session.scalar(text("SHOW statement_timeout")) == "30s"


def test_command_line_work_runs_under_the_worker_or_export_budget(crowded_url: str, settings: Settings) -> None:
    async def show(session: AsyncSession) -> Any:
        return await session.scalar(text("SHOW statement_timeout"))

    cli = settings.model_copy(update={"database_url": crowded_url, "statement_timeout_worker_seconds": 45})
    assert _in_transaction(cli, show) == "45s"  # `carnet retention`, `carnet token create`, ...
    assert _in_transaction(cli, show, statement_timeout=7200) == "2h"  # `carnet export`


async def test_a_costly_read_runs_on_one_core_under_its_own_timeout_and_leaves_the_connection_as_it_was(
    crowded_url: str,
) -> None:
    # Parallel workers would let each capped read take 3 cores: 4 previews kept 11 backends busy (bench_costly.py).
    conn = await asyncpg.connect(plain_dsn(crowded_url), server_settings=server_settings(statement_timeout=10))
    try:
        before = await conn.fetchval("SHOW max_parallel_workers_per_gather")
        async with within(conn, 30, kind="a test read"):
            assert await conn.fetchval("SHOW max_parallel_workers_per_gather") == "0"
            assert await conn.fetchval("SHOW statement_timeout") == "30s"
            assert await conn.fetchval("SHOW transaction_read_only") == "on"
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SHOW statement_timeout") == "10s"
        assert await conn.fetchval("SHOW max_parallel_workers_per_gather") == before
    finally:
        await conn.close()


def test_costly_reads_may_never_be_allowed_the_whole_pool(settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match="COSTLY_READS_PER_PROCESS"):
        create_app(settings.model_copy(update={"costly_reads_per_process": settings.database_pool_size}))
