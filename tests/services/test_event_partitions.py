"""The monthly partitions of `event` (issue 18): made ahead, split out of the default partition, dropped after
EVENT_RETENTION_MONTHS with their dedupe keys; readers never break when a month is gone; segments prune.

The module has a database of its own: its partition DDL commits, and its clock moves months at a time.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from app.db import make_engine, make_sessionmaker, plain_dsn
from app.main import create_app
from app.services import segments
from app.services.event_partitions import Months, add_months, ensure_month, month_of, partition_name, run_upkeep
from app.settings import Settings
from tests.conftest import migrated_database
from tests.factories import ADMIN, unique_email

pytestmark = pytest.mark.committing

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def events_url(server_url: str) -> Iterator[str]:
    with migrated_database(server_url, f"carnet_events_{os.getpid()}") as url:
        yield url


@pytest_asyncio.fixture(loop_scope="session")
async def world(events_url: str, settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Any]]:
    """A client on the module's database (the app's own sessions: real commits), its sessionmaker, a connection."""
    app = create_app(settings.model_copy(update={"database_url": events_url}))
    engine = make_engine(events_url, pool_size=3)
    db = await asyncpg.connect(plain_dsn(events_url))
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as http:
            yield http, make_sessionmaker(engine), db
    finally:
        await db.execute("TRUNCATE contact, event_key CASCADE")
        await db.close()
        await engine.dispose()


async def _contact(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/contacts", json={"email": unique_email()}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _post(http: httpx.AsyncClient, contact_id: str, at: datetime, *, event_id: str | None = None,
                type_: str = "page_view") -> httpx.Response:
    body = {"contact": {"id": contact_id}, "type": type_, "occurred_at": at.isoformat(), "event_id": event_id}
    return await http.post("/v1/events", json=body, headers=ADMIN)


async def _store_legacy(db: asyncpg.Connection, contact_id: str, at: datetime, *, event_id: str) -> None:
    """An event as the API stored it before it refused dates ahead: the row and its dedupe key."""
    async with db.transaction():
        stored = await db.fetchval(
            "INSERT INTO event (event_id, contact_id, type, occurred_at, properties, created_at) "
            "VALUES ($1, $2, 'page_view', $3, '{}', now()) RETURNING id", event_id, uuid.UUID(contact_id), at)
        await db.execute("INSERT INTO event_key (event_id, id, occurred_at) VALUES ($1, $2, $3)", event_id, stored, at)


async def _home(db: asyncpg.Connection, event_id: str) -> str | None:
    """The partition an event is stored in."""
    return await db.fetchval("SELECT tableoid::regclass::text FROM event WHERE event_id = $1", event_id)


def _mid(month: Any) -> datetime:
    return datetime(month.year, month.month, 15, 12, tzinfo=UTC)


async def test_upkeep_makes_months_ahead_and_splits_late_and_early_events_out_of_the_default(world: Any) -> None:
    http, sessions, db = world
    contact = await _contact(http)
    back, beyond = add_months(month_of(NOW), -6), add_months(month_of(NOW), 5)
    assert (await _post(http, contact, _mid(back), event_id="back-1")).status_code == 201
    # The API refuses an event dated more than a day ahead (docs/api.md); one stored before that rule, or by a
    # clock gone wrong, still has a home: the default partition, until its month is made.
    assert (await _post(http, contact, _mid(beyond), event_id="beyond-0")).status_code == 422
    await _store_legacy(db, contact, _mid(beyond), event_id="beyond-1")
    for key in ("back", "beyond"):
        assert await _home(db, f"{key}-1") == "event_default"  # no partition for that month: never a failure

    report = await run_upkeep(sessions, retention_months=25, now=NOW)
    assert partition_name(back) in report["created"] and report["deferred"] == []
    assert await _home(db, "back-1") == partition_name(back)      # inside the window: split out
    assert await _home(db, "beyond-1") == "event_default"         # past the months made ahead: waits there
    assert set(Months.around(NOW, retention_months=25).ahead()) <= set(await _months(db))

    later = await run_upkeep(sessions, retention_months=25, now=_mid(add_months(month_of(NOW), 2)))
    assert partition_name(beyond) in later["created"]
    assert await _home(db, "beyond-1") == partition_name(beyond)  # its month came within AHEAD_MONTHS

    # The moved events keep their dedupe keys: a replay, even with another occurred_at, is the stored event.
    for key in ("back-1", "beyond-1"):
        replay = await _post(http, contact, NOW, event_id=key)
        assert replay.status_code == 200 and replay.json()["occurred_at"] != NOW.isoformat()
    assert await db.fetchval("SELECT count(*) FROM event_key WHERE event_id IN ('back-1', 'beyond-1')") == 2
    assert await run_upkeep(sessions, retention_months=25, now=NOW) == {
        "created": [], "dropped": [], "purged": 0, "deferred": []}  # idempotent


async def test_retention_drops_whole_months_and_their_keys_and_every_reader_carries_on(world: Any) -> None:
    http, sessions, db = world
    contact = await _contact(http)
    old, recent = add_months(month_of(NOW), -30), add_months(month_of(NOW), -1)
    order = {"contact": {"id": contact}, "placed_at": _mid(old).isoformat(), "status": "paid", "currency": "EUR",
             "total_amount": "49.90"}
    assert (await http.put("/v1/orders/o-old-1", json=order, headers=ADMIN)).status_code == 201
    for key, at in (("old-1", _mid(old)), ("old-2", _mid(old) + timedelta(days=3)), ("recent-1", _mid(recent)),
                    ("now-1", NOW)):
        assert (await _post(http, contact, at, event_id=key)).status_code == 201
    await run_upkeep(sessions, retention_months=25, now=_mid(add_months(month_of(NOW), -12)))  # a year ago
    assert await _home(db, "old-1") == partition_name(old)  # then inside the window: its own partition
    assert (await _post(http, contact, datetime(1999, 5, 17, tzinfo=UTC), event_id="ancient-1")).status_code == 201
    stats_before = await _stats(http, contact)

    report = await run_upkeep(sessions, retention_months=25, now=NOW)
    assert partition_name(old) in report["dropped"] and report["deferred"] == []
    assert report["purged"] == 1  # the 1999 event, back-dated beyond retention, from the default partition
    assert partition_name(old) not in await _tables(db)
    keys = await db.fetch("SELECT event_id FROM event_key WHERE event_id = ANY($1)",
                          ["old-1", "old-2", "ancient-1", "recent-1", "now-1"])
    assert sorted(r["event_id"] for r in keys) == ["now-1", "recent-1"]

    events = await http.get(f"/v1/contacts/{contact}/events", headers=ADMIN)
    assert events.status_code == 200 and {e["event_id"] for e in events.json()["data"]} == {"recent-1", "now-1"}
    timeline = await http.get(f"/v1/contacts/{contact}/timeline", params={"limit": 2}, headers=ADMIN)
    assert timeline.status_code == 200, timeline.text
    rest = await http.get(f"/v1/contacts/{contact}/timeline", params={"cursor": timeline.json()["next_cursor"]},
                          headers=ADMIN)
    assert rest.status_code == 200 and "order" in {e["kind"] for e in rest.json()["data"]}
    export = await http.get(f"/v1/contacts/{contact}/export", headers=ADMIN)
    assert export.status_code == 200 and len(export.json()["events"]) == 2
    count = await http.post("/v1/segments/preview", headers=ADMIN, json={"filter": {"all": [
        {"field": "events.type", "op": "eq", "value": "page_view", "within_days": 30}]}})
    assert count.status_code == 200 and count.json()["count"] >= 1
    assert await _stats(http, contact) == stats_before  # stats come from orders: untouched
    # A dropped month's key is gone with it: the same event_id is new again (and back-dated beyond retention,
    # it waits in the default partition for the next purge).
    assert (await _post(http, contact, _mid(old), event_id="old-1")).status_code == 201
    assert (await http.delete(f"/v1/contacts/{contact}", headers=ADMIN)).status_code == 204  # erasure still works
    assert await db.fetchval("SELECT count(*) FROM event_key WHERE event_id = ANY($1)", ["recent-1", "now-1"]) == 0


async def test_an_events_type_segment_scans_only_the_partitions_in_its_window(world: Any) -> None:
    """EXPLAIN of the SQL GET /v1/segments/{id}/count runs: months before the 30-day window are pruned."""
    http, sessions, db = world
    months = [add_months(month_of(NOW), -i) for i in range(1, 13)]
    async with sessions.begin() as session:
        for month in months:
            await ensure_month(session, month)
    filter_ = {"all": [{"field": "events.type", "op": "eq", "value": "page_view", "within_days": 30}]}
    compiled = segments._compile(filter_, {}, NOW)
    statements = [segments._Statement.of(compiled.counting(hashed), compiled.clock) for hashed in (False, True)]
    cutoff = month_of(NOW - timedelta(days=30))
    in_window = {partition_name(m) for m in await _months(db) if m >= cutoff}
    for statement in statements:  # both forms of the count (by a sort, by a hash: segments._hashes_better)
        assert "occurred_at >=" in statement.sql  # the bound the planner prunes with (a parameter, the cutoff)
        plan = json.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) {statement.sql}", *statement.arguments(NOW)))
        scanned = {name for name in _relations(plan) if name.startswith("event_")}
        assert scanned == in_window | {"event_default"}, scanned  # default: it may hold any month not yet split
        assert partition_name(add_months(cutoff, -1)) not in scanned and len(scanned) < len(await _months(db))
    # Counted from the events alone (a lone activity condition): the same number as contacts having one.
    contacts = [await _contact(http) for _ in range(3)]
    for contact, days in zip(contacts, (1, 29, 45), strict=True):
        for _ in range(2):
            assert (await _post(http, contact, NOW - timedelta(days=days))).status_code == 201
    having = await db.fetchval("SELECT count(*) FROM contact c WHERE EXISTS (SELECT 1 FROM event e WHERE "
                               "e.contact_id = c.id AND e.type = 'page_view' AND e.occurred_at >= $1)",
                               NOW - timedelta(days=30))
    for statement in statements:
        assert await db.fetchval(statement.sql, *statement.arguments(NOW)) == having >= 2


async def test_an_events_type_count_sorts_or_hashes_as_the_planner_expects_its_rows(
    world: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /v1/segments/{id}/count of a lone events.type condition: by `count(DISTINCT)` (a sort) while the
    planner expects the matching rows to fit in work_mem, else by a DISTINCT subquery (a hash); the same
    answers either way, for a common and a rare type, and the form chosen again once FORM_SECONDS have passed."""
    http, _, db = world
    contacts = [await _contact(http) for _ in range(40)]
    # in the 30-day window: 8,000 page views by 40 contacts, 12 abandoned carts by 3; before it, more of both
    for type_, rows, spread, days in (("page_view", 8000, 40, 0), ("cart_abandoned", 12, 3, 0),
                                      ("page_view", 500, 40, 40), ("cart_abandoned", 50, 40, 40)):
        await db.execute(
            "INSERT INTO event (event_id, contact_id, type, occurred_at, properties, created_at) "
            "SELECT $1::text || n, ($2::uuid[])[1 + n % $3::int], $4, $5::timestamptz - n * interval '1 minute', "
            "'{}', now() FROM generate_series(1, $6::int) n", f"est-{type_}-{days}-", contacts, spread, type_,
            NOW - timedelta(days=days), rows)
    await db.execute("ANALYZE event")
    ids = {}
    for type_ in ("page_view", "cart_abandoned"):
        filter_ = {"all": [{"field": "events.type", "op": "eq", "value": type_, "within_days": 30}]}
        response = await http.post("/v1/segments", json={"name": f"est {type_}", "filter": filter_}, headers=ADMIN)
        assert response.status_code == 201, response.text
        ids[type_] = uuid.UUID(response.json()["id"])
    having = {type_: await db.fetchval(
        "SELECT count(*) FROM contact c WHERE EXISTS (SELECT 1 FROM event e WHERE e.contact_id = c.id "
        "AND e.type = $1 AND e.occurred_at >= $2)", type_, NOW - timedelta(days=30)) for type_ in ids}
    assert having == {"page_view": 40, "cart_abandoned": 3}
    for type_, segment_id in ids.items():  # the endpoint, at the server's work_mem (4 MB): both by a sort
        response = await http.get(f"/v1/segments/{segment_id}/count", headers=ADMIN)
        assert response.json()["count"] == having[type_], response.text

    async def counted(type_: str) -> tuple[int, bool]:
        total = await segments.count_stored(db, ids[type_], now=NOW)
        return total, segments._cached_counts[ids[type_]].other_chosen

    segments._cached_counts.clear()
    await db.execute("SET work_mem = '64kB'")  # hashed from 5 x 1,024 sorted rows: the 8,000 page views are
    try:
        for _ in range(2):  # compiled and chosen, then from the cache
            assert await counted("page_view") == (40, True)
            assert await counted("cart_abandoned") == (3, False)
        cached = segments._cached_counts[ids["page_view"]]
        assert "count(DISTINCT" in cached.usual.sql and "count(DISTINCT" not in cached.other.sql  # type: ignore[union-attr]
        await db.execute("SET work_mem = '64MB'")
        assert await counted("page_view") == (40, True)  # kept: chosen less than FORM_SECONDS ago
        monkeypatch.setattr(segments, "FORM_SECONDS", 0.0)
        assert await counted("page_view") == (40, False)  # chosen again: now the sort fits
        assert segments._cached_counts[ids["page_view"]] is cached
    finally:
        await db.execute("RESET work_mem")


async def _months(db: asyncpg.Connection) -> list[Any]:
    names = await _tables(db)
    return sorted(datetime.strptime(n, "event_y%Ym%m").date() for n in names if n != "event_default")


async def _tables(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                          "WHERE i.inhparent = 'event'::regclass")
    return [r["relname"] for r in rows]


async def _stats(http: httpx.AsyncClient, contact_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/contacts/{contact_id}", headers=ADMIN)
    return dict(response.json()["stats"])


def _relations(plan: Any) -> Iterator[str]:
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            yield plan["Relation Name"]
        for value in plan.values():
            yield from _relations(value)
    elif isinstance(plan, list):
        for item in plan:
            yield from _relations(item)


def test_month_arithmetic() -> None:
    assert add_months(datetime(2026, 12, 1).date(), 1) == datetime(2027, 1, 1).date()
    assert add_months(datetime(2026, 1, 1).date(), -13) == datetime(2024, 12, 1).date()
    assert month_of(datetime(2026, 12, 31, 23, 30, tzinfo=UTC) + timedelta(hours=1)) == datetime(2027, 1, 1).date()
    assert partition_name(datetime(987, 3, 1).date()) == "event_y0987m03"
