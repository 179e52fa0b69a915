"""Segment count at scale: Carnet's compiled filter vs the best hand-written SQL, side by side, in one run.

    .venv/bin/python bench/bench_segments.py [--contacts 1000000 --orders 3000000 --events 5000000]
                                             [--runs 20] [--keep-db] [--reuse-db]

What it does:
  1. (Re)creates the database `carnet_bench_seg`, runs Carnet's migrations, and generates the data
     server-side (`INSERT ... SELECT generate_series`): orders first (2 years, skewed over 60% of the
     contacts, 5% cancelled/refunded, 1-3 items with sku/category), then contacts whose stats are the
     aggregate of their orders (city: ~300 cities, log-uniform skew; tags: 5% `vip`, correlated with heavy
     buyers), then events. Secondary indexes and the order/event constraints are dropped during the load
     and re-created from their own definitions afterwards (pg_indexes / pg_get_constraintdef), then
     VACUUM ANALYZE.
  2. The question "contacts with >= 2 orders in the last 90 days AND tag vip AND city = Lyon" as a
     Carnet segment, counted exactly as GET /v1/segments/{id}/count does (`segments.count_stored` on the
     bare pooled connection; `carnet_session` = the previous path, segment_condition + count in a read
     session), vs 4 hand-written SQL variants (the fastest is kept). Counts must be equal.
  3. Measures alternately (hand, carnet, carnet_sql, carnet_session, then reversed, ...) after warm-up,
     prints p50s and ratios,
     captures EXPLAIN (ANALYZE, BUFFERS) of both, writes bench/out/segments.json.
  4. Drops the database unless --keep-db.

With `--phase sync` (or `all`): segments as a sync source (app.services.segment_sync), on the same data. A
webhook destination (inserted directly; no worker runs, nothing is delivered) maps a segment; per segment of
SYNC_CASES, alternated with the hand count of the same segment (ABBA) on one pooled connection: the first
refresh (every member enters, one outbox row each: the backfill), the steady refresh (nothing changed; also the
diff statement alone, rolled back) and a refresh after ~1% of the members changed (vip tag removed from 1% of
them and added to as many people it brings in, one UPDATE). Each refresh's members/entered/left are checked
against set arithmetic in SQL, and its outbox rows counted. Writes bench/out/segment_sync.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"

TARGET_RATIO = 1.2
SEGMENT_NAME = "bench: vip Lyon repeat buyers"
CITY = "Lyon"
FILTER = {"all": [
    {"field": "orders.count", "op": "gte", "value": 2, "within_days": 90},
    {"field": "tags", "op": "contains", "value": "vip"},
    {"field": "address.city", "op": "eq", "value": CITY},
]}

REAL_CITIES = ["Paris", "Marseille", "Lyon", "Toulouse", "Nice", "Nantes", "Montpellier", "Strasbourg",
               "Bordeaux", "Lille", "Rennes", "Reims", "Toulon", "Saint-Etienne", "Le Havre", "Grenoble",
               "Dijon", "Angers", "Nimes", "Villeurbanne"]
N_CITIES = 300

# the same question, by hand ($1 = lower(city), $2 = cutoff timestamptz)
HAND = {
    "correlated_count": """
        SELECT count(*) FROM contact c
        WHERE lower(c.city) = $1 AND cardinality(c.tags) > 0 AND c.tags @> ARRAY['vip']::text[]
          AND (SELECT count(*) FROM "order" o
               WHERE o.contact_id = c.id AND o.placed_at >= $2
                 AND o.status NOT IN ('cancelled', 'refunded')) >= 2""",
    "exists_offset_1": """
        SELECT count(*) FROM contact c
        WHERE lower(c.city) = $1 AND cardinality(c.tags) > 0 AND c.tags @> ARRAY['vip']::text[]
          AND EXISTS (SELECT 1 FROM "order" o
                      WHERE o.contact_id = c.id AND o.placed_at >= $2
                        AND o.status NOT IN ('cancelled', 'refunded')
                      OFFSET 1)""",
    "join_group_having": """
        SELECT count(*) FROM (
          SELECT c.id FROM contact c JOIN "order" o ON o.contact_id = c.id
          WHERE lower(c.city) = $1 AND cardinality(c.tags) > 0 AND c.tags @> ARRAY['vip']::text[]
            AND o.placed_at >= $2 AND o.status NOT IN ('cancelled', 'refunded')
          GROUP BY c.id HAVING count(*) >= 2) s""",
    "orders_first_having": """
        SELECT count(*) FROM contact c
        JOIN (SELECT contact_id FROM "order"
              WHERE placed_at >= $2 AND status NOT IN ('cancelled', 'refunded')
              GROUP BY contact_id HAVING count(*) >= 2) o ON o.contact_id = c.id
        WHERE lower(c.city) = $1 AND cardinality(c.tags) > 0 AND c.tags @> ARRAY['vip']::text[]""",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--orders", type=int, default=3_000_000)
    p.add_argument("--events", type=int, default=5_000_000)
    p.add_argument("--runs", type=int, default=20, help="measured runs per system (alternating)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--db", default="carnet_bench_seg")
    p.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    p.add_argument("--reuse-db", action="store_true", help="skip generation: use the existing database")
    p.add_argument("--phase", choices=["count", "sync", "all"], default="count",
                   help="count: segment count vs hand SQL; sync: segments as a sync source (refresh cost)")
    p.add_argument("--sync-cases", nargs="+", choices=list(SYNC_CASES), default=list(SYNC_CASES))
    p.add_argument("--sync-first-runs", type=int, default=6, help="first refreshes per case (alternating)")
    p.add_argument("--sync-change-runs", type=int, default=10, help="refreshes after ~1%% changed, per case")
    p.add_argument("--sync-timeout", type=int, default=60, help="statement_timeout (s) of the unanalyzed check")
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ----------------------------------------------------------------------------------------------


async def recreate_db(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(f"{args.pg}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{args.db}"')
    finally:
        await admin.close()


async def drop_db(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(f"{args.pg}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')
    finally:
        await admin.close()


async def make_event_months(url: str) -> None:
    """The monthly partitions of `event` for the two years of events generated, as the worker's upkeep makes them
    (app.services.event_partitions): without them every event lands in the default partition, not a month's."""
    from app.db import make_engine, make_sessionmaker
    from app.services.event_partitions import add_months, ensure_month, month_of

    engine = make_engine(url, pool_size=1)
    async with make_sessionmaker(engine).begin() as session:
        for back in range(25):
            await ensure_month(session, add_months(month_of(datetime.now(UTC)), -back))
    await engine.dispose()


async def generate(conn: asyncpg.Connection, args: argparse.Namespace) -> dict[str, float]:
    timings: dict[str, float] = {}
    await conn.execute("SET synchronous_commit = off; SET maintenance_work_mem = '1GB';"
                       "SET max_parallel_maintenance_workers = 2; SET work_mem = '256MB'")
    # secondary indexes of the three tables, and all constraints of order/event: dropped for the load,
    # re-created from their own definitions afterwards (so the schema ends up exactly as migrated)
    indexes = await conn.fetch("""
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename IN ('contact', 'order', 'event')
          AND indexname NOT IN (SELECT conname FROM pg_constraint)""")
    constraints = await conn.fetch("""
        SELECT conrelid::regclass::text AS tbl, conname, contype, pg_get_constraintdef(oid) AS def
        FROM pg_constraint
        WHERE conrelid IN ('"order"'::regclass, 'event'::regclass) AND contype IN ('p', 'u', 'f')
        ORDER BY contype = 'f'""")
    referenced = await conn.fetch("""
        SELECT conname FROM pg_constraint WHERE contype = 'f'
          AND confrelid IN ('"order"'::regclass, 'event'::regclass)""")
    assert not referenced, "order/event are referenced by foreign keys: cannot drop their keys for the load"
    for c in reversed(constraints):
        await conn.execute(f'ALTER TABLE {c["tbl"]} DROP CONSTRAINT "{c["conname"]}"')
    for i in indexes:
        await conn.execute(f'DROP INDEX "{i["indexname"]}"')

    C, O, E = args.contacts, args.orders, args.events  # noqa: E741
    cities = REAL_CITIES + [f"Ville-{k:03d}" for k in range(len(REAL_CITIES) + 1, N_CITIES + 1)]
    t = time.perf_counter()
    # contact number ci (1..C) has id md5('c'||ci)::uuid; buyers are the first 60%, skewed to low numbers
    await conn.execute(f"""
        INSERT INTO "order" (id, external_id, contact_id, placed_at, status, currency, total_amount, channel,
                             items, created_at, updated_at)
        SELECT gen_random_uuid(), 'ord-' || g, md5('c' || ci)::uuid, placed, st, 'EUR', it.total, ch,
               it.items, placed, placed
        FROM (
          SELECT g,
                 1 + floor({C} * 0.6 * power(random(), 1.6))::int AS ci,
                 now() - random() * interval '730 days' AS placed,
                 CASE WHEN r < 0.03 THEN 'cancelled' WHEN r < 0.05 THEN 'refunded' WHEN r < 0.10 THEN 'placed'
                      WHEN r < 0.20 THEN 'paid' WHEN r < 0.30 THEN 'shipped' ELSE 'delivered' END AS st,
                 (ARRAY['web', 'web', 'web', 'store', 'phone', 'marketplace'])[1 + floor(random() * 6)::int] AS ch
          FROM (SELECT g, random() AS r FROM generate_series(1, {O}) g) s
        ) o,
        LATERAL (
          SELECT jsonb_agg(jsonb_build_object(
                   'sku', 'SKU-' || lpad(sku::text, 5, '0'),
                   'category', (ARRAY['shoes', 'bags', 'shirts', 'trousers', 'jackets', 'hats', 'socks',
                                      'accessories'])[1 + sku % 8],
                   'quantity', q, 'unit_price', (5 + sku % 195)::numeric)) AS items,
                 sum(q * (5 + sku % 195))::numeric(14, 2) AS total
          FROM (SELECT floor(2000 * power(random(), 2))::int AS sku, 1 + floor(random() * 3)::int AS q
                FROM generate_series(1, 1 + (o.g % 3))) x
        ) it""")
    timings["orders"] = time.perf_counter() - t
    log(f"orders: {O:,} rows in {timings['orders']:.0f} s")

    t = time.perf_counter()
    await conn.execute(f"""
        INSERT INTO contact (id, external_id, email, email_status, first_name, last_name, postal_code, city,
                             country, language, source, kind, lifecycle_stage, tags, orders_count, total_spent,
                             average_basket, first_order_at, last_order_at, currency, created_at, updated_at,
                             last_activity_at, version)
        SELECT md5('c' || i)::uuid, 'ext-' || i, 'user' || i || '@example.com', 'valid',
               'First' || (i % 997), 'Last' || (i % 4999), lpad((1000 + i % 95000)::text, 5, '0'),
               ($1::text[])[floor(exp(random() * ln({N_CITIES})))::int],
               'FR', 'fr', (ARRAY['newsletter_form', 'import', 'shop', 'api'])[1 + i % 4],
               CASE WHEN s.n > 0 THEN 'customer' WHEN i % 50 = 0 THEN 'partner' ELSE 'prospect' END,
               CASE WHEN s.n IS NULL OR s.n = 0 THEN 'prospect' WHEN s.n = 1 THEN 'new_customer'
                    WHEN s.last_at < now() - interval '365 days' THEN 'lapsed_customer'
                    ELSE 'loyal_customer' END,
               array_remove(ARRAY[
                 CASE WHEN random() < CASE WHEN i <= {C} * 0.05 THEN 0.3 ELSE 0.0368 END THEN 'vip' END,
                 CASE WHEN random() < 0.30 THEN 'newsletter' END,
                 CASE WHEN random() < 0.10 THEN 'b2b' END,
                 CASE WHEN random() < 0.02 THEN 'press' END], NULL),
               coalesce(s.n, 0), coalesce(s.spent, 0), s.spent / nullif(s.n, 0), s.first_at, s.last_at,
               CASE WHEN s.n > 0 THEN 'EUR' END,
               least(coalesce(s.first_at, now()), now()) - interval '30 days', now(), s.last_at, 1
        FROM generate_series(1, {C}) i
        LEFT JOIN (SELECT contact_id, count(*) FILTER (WHERE status NOT IN ('cancelled', 'refunded')) AS n,
                          sum(total_amount) FILTER (WHERE status NOT IN ('cancelled', 'refunded')) AS spent,
                          min(placed_at) AS first_at, max(placed_at) AS last_at
                   FROM "order" GROUP BY contact_id) s ON s.contact_id = md5('c' || i)::uuid""", cities)
    timings["contacts"] = time.perf_counter() - t
    log(f"contacts: {C:,} rows in {timings['contacts']:.0f} s")

    t = time.perf_counter()
    await conn.execute(f"""
        INSERT INTO event (contact_id, type, occurred_at, properties, created_at)
        SELECT md5('c' || (1 + floor({C} * power(random(), 1.3))::int))::uuid,
               CASE WHEN r < 0.60 THEN 'page_view' WHEN r < 0.80 THEN 'email_open' WHEN r < 0.90 THEN 'email_click'
                    WHEN r < 0.97 THEN 'cart_add' ELSE 'checkout' END,
               at, jsonb_build_object('path', '/p/' || (g % 5000)), at
        FROM (SELECT g, random() AS r, now() - random() * interval '730 days' AS at
              FROM generate_series(1, {E}) g) s""")
    timings["events"] = time.perf_counter() - t
    log(f"events: {E:,} rows in {timings['events']:.0f} s")

    t = time.perf_counter()
    for c in constraints:
        await conn.execute(f'ALTER TABLE {c["tbl"]} ADD CONSTRAINT "{c["conname"]}" {c["def"]}')
    for i in indexes:
        # pg_indexes writes a partitioned table's index `ON ONLY event`: as written, it would be left on the parent
        # alone (invalid, none on the months); without ONLY it is made on every partition, as the migration's was
        await conn.execute(i["indexdef"].replace(" ON ONLY ", " ON ", 1))
    timings["indexes"] = time.perf_counter() - t
    log(f"indexes and constraints re-created in {timings['indexes']:.0f} s")

    t = time.perf_counter()
    await conn.execute('VACUUM (ANALYZE) contact, "order", event')
    timings["vacuum_analyze"] = time.perf_counter() - t
    log(f"VACUUM ANALYZE in {timings['vacuum_analyze']:.0f} s")
    return timings


# ---- measuring -----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(ms), 3), "p90_ms": round(pct(ms, 0.9), 3),
            "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3), "n": len(ms)}


async def fastest_hand(pooled: Callable[..., Any]) -> tuple[dict[str, dict[str, float]], str]:
    """The fastest hand variant: 1 warm-up + 7 runs each, interleaved."""
    for sql in HAND.values():
        await pooled(sql, CITY.lower(), datetime.now(UTC) - timedelta(days=90))
    trial: dict[str, list[float]] = {k: [] for k in HAND}
    for _ in range(7):
        for name, sql in HAND.items():
            t = time.perf_counter()
            await pooled(sql, CITY.lower(), datetime.now(UTC) - timedelta(days=90))
            trial[name].append((time.perf_counter() - t) * 1000)
    variants = {k: summary(v) for k, v in trial.items()}
    best = min(variants, key=lambda k: variants[k]["p50_ms"])
    log("hand variants p50 ms: " + ", ".join(f"{k}={v['p50_ms']:.2f}" for k, v in variants.items())
        + f" -> best {best}")
    return variants, best


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from sqlalchemy import delete, func, select
    from sqlalchemy.dialects.postgresql import insert

    from app.db import bare_connection, make_engine, make_read_sessionmaker, make_sessionmaker
    from app.models import Contact, Segment
    from app.services import segments
    from app.timeouts import within

    # ONE pooled connection (one server backend) for every system measured: a backend that once ran a big
    # query (the slow hand variant, a count over 5M events) runs this ~15 ms query ~2.5 ms faster afterwards
    # (its allocator keeps the memory; measured 17.1 -> 14.6 ms on one backend while another stayed at 17),
    # which on two separate connections showed up as a Carnet overhead that was not Carnet's.
    engine = make_engine(url, pool_size=1)
    makers = make_sessionmaker(engine)
    readers = make_read_sessionmaker(engine)  # what ReadSession routes use in production
    conn = await asyncpg.connect(url)
    try:
        sizes = {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in ("contact", "order", "event")}
        sizes["table_mb"] = {t: round(await conn.fetchval(f"SELECT pg_total_relation_size('\"{t}\"') / 1048576.0"), 1)
                             for t in ("contact", "order", "event")}
        segment_id = uuid.uuid4()
        async with makers() as s, s.begin():  # --reuse-db: the previous run's segment goes first
            await s.execute(delete(Segment.__table__).where(Segment.__table__.c.name == SEGMENT_NAME))
            await s.execute(insert(Segment.__table__).values(
                id=segment_id, name=SEGMENT_NAME, filter=FILTER, description=None,
                created_at=datetime.now(UTC), updated_at=datetime.now(UTC)))

        # what the app's lifespan puts on app.state, for app.db.bare_connection (the endpoint's connection)
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
            sessionmaker=makers, replica_sessionmaker=readers)))

        async def carnet() -> int:  # exactly what GET /v1/segments/{id}/count runs, minus HTTP
            async with (bare_connection(request, replica=True) as connection,  # type: ignore[arg-type]
                        within(connection, 30, kind="a count")):  # its statement timeout (app.timeouts)
                return await segments.count_stored(connection, segment_id)

        async def carnet_session() -> int:  # the endpoint's previous path: the service calls in a read session
            async with readers() as s:
                return await segments.count(s, await segments.segment_condition(s, segment_id))

        async def pooled(sql: str, *params: Any) -> Any:  # hand SQL on the same pooled connection as Carnet
            async with bare_connection(request, replica=True) as connection:  # type: ignore[arg-type]
                return await connection.fetchval(sql, *params)

        # -- correctness: the same `now` for all
        now = datetime.now(UTC)
        cutoff = now - timedelta(days=90)
        async with makers() as s:
            condition = await segments.compile_filter(s, FILTER, now=now)
            carnet_count = await segments.count(s, condition)
            statement = select(func.count()).select_from(Contact.__table__).where(condition)
            compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
            carnet_sql = compiled.string
            carnet_params = [compiled.params[k] for k in compiled.positiontup]  # type: ignore[union-attr]
        counts = {"carnet": await carnet(), "carnet_session": await carnet_session(), "compiled": carnet_count}
        for name, sql in HAND.items():
            counts[name] = await pooled(sql, CITY.lower(), cutoff)
        counts["carnet_sql"] = await pooled(carnet_sql, *carnet_params)
        log(f"counts: {counts}")
        counts_match = len(set(counts.values())) == 1

        variants, best = await fastest_hand(pooled)
        best_sql = HAND[best]

        async def hand() -> int:
            return await pooled(best_sql, CITY.lower(), datetime.now(UTC) - timedelta(days=90))  # type: ignore[no-any-return]


        async def carnet_sql_only() -> int:  # Carnet's compiled SQL, on the raw connection (no ORM/session)
            params = [datetime.now(UTC) - timedelta(days=90) if isinstance(v, datetime) else v
                      for v in carnet_params]
            return await pooled(carnet_sql, *params)  # type: ignore[no-any-return]

        systems = {"hand": hand, "carnet": carnet, "carnet_sql": carnet_sql_only, "carnet_session": carnet_session}
        for _ in range(args.warmup):
            for fn in systems.values():
                await fn()
        times: dict[str, list[float]] = {k: [] for k in systems}
        for r in range(args.runs):
            order = list(systems) if r % 2 == 0 else list(reversed(systems))  # ABC CBA ...
            for name in order:
                t = time.perf_counter()
                await systems[name]()
                times[name].append((time.perf_counter() - t) * 1000)
        results = {k: summary(v) for k, v in times.items()}
        ratio = results["carnet"]["p50_ms"] / results["hand"]["p50_ms"]
        ratio_sql = results["carnet_sql"]["p50_ms"] / results["hand"]["p50_ms"]

        explain_params = [cutoff if isinstance(v, datetime) else v for v in carnet_params]
        plans = {
            "hand": "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + best_sql, CITY.lower(), cutoff)),
            "carnet": "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + carnet_sql, *explain_params)),
        }
        for name in HAND:
            if name != best:
                plans[f"hand_{name}"] = "\n".join(r[0] for r in await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS) " + HAND[name], CITY.lower(), cutoff))
        indexes = [dict(r) for r in await conn.fetch(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE tablename IN ('contact', 'order') "
            "ORDER BY 1, 2")]
        return {
            "sizes": sizes, "filter": FILTER, "counts": counts, "counts_match": counts_match,
            "hand_variants": variants, "hand_best": best, "hand_sql": best_sql.strip(),
            "carnet_sql": carnet_sql, "carnet_params": [str(p) for p in carnet_params],
            "results": results, "ratio_carnet_over_hand": round(ratio, 3),
            "ratio_carnet_sql_over_hand": round(ratio_sql, 3), "target_ratio": TARGET_RATIO,
            "meets_target": ratio <= TARGET_RATIO, "runs": times, "plans": plans, "indexes": indexes,
        }
    finally:
        await conn.close()
        await engine.dispose()


# ---- segments as a sync source (--phase sync) -----------------------------------------------------------

SYNC_DESTINATION = "bench: segment sync webhook"
SYNC_SEGMENT_PREFIX = "bench: synced "
# The bench's question as a set ($1 = lower(city), $2 = cutoff): the reference the snapshot is checked against,
# and the people one tag away from it (Lyon repeat buyers without `vip`), who enter when tagged.
REPEAT_BUYERS = """
    SELECT c.id FROM contact c
    WHERE lower(c.city) = $1 AND {tag}
      AND EXISTS (SELECT 1 FROM "order" o
                  WHERE o.contact_id = c.id AND o.placed_at >= $2
                    AND o.status NOT IN ('cancelled', 'refunded')
                  OFFSET 1)"""
# ~1% of the members leave (tag removed) and as many near-members enter (tag added), in ONE statement
TOGGLE_VIP = """
    UPDATE contact SET tags = CASE WHEN id = ANY($1::uuid[]) THEN array_remove(tags, 'vip')
                                   ELSE array_append(tags, 'vip') END
    WHERE id = ANY($1::uuid[]) OR id = ANY($2::uuid[])"""


@dataclass(frozen=True, slots=True)
class SyncCase:
    filter: dict[str, Any]
    count_sql: str | None          # the hand count; None: the fastest of HAND, picked in the run
    members_sql: str               # the same question as a set of ids
    near_sql: str                  # people the vip tag alone would bring in
    params: Callable[[datetime], tuple[Any, ...]]


def _city_and_cutoff(now: datetime) -> tuple[Any, ...]:
    return CITY.lower(), now - timedelta(days=90)


def _no_params(now: datetime) -> tuple[Any, ...]:
    return ()


SYNC_CASES = {
    # the count phase's 3-condition segment (a few hundred members)
    "vip_lyon_repeat": SyncCase(FILTER, None,
                                REPEAT_BUYERS.format(tag="cardinality(c.tags) > 0 AND c.tags @> ARRAY['vip']::text[]"),
                                REPEAT_BUYERS.format(tag="NOT c.tags @> ARRAY['vip']::text[]"), _city_and_cutoff),
    # one wide condition (5% of the contacts): what a large snapshot costs
    "vip": SyncCase({"all": [{"field": "tags", "op": "contains", "value": "vip"}]},
                    "SELECT count(*) FROM contact c WHERE cardinality(c.tags) > 0 AND c.tags @> ARRAY['vip']::text[]",
                    "SELECT c.id FROM contact c WHERE cardinality(c.tags) > 0 AND c.tags @> ARRAY['vip']::text[]",
                    "SELECT c.id FROM contact c WHERE NOT c.tags @> ARRAY['vip']::text[]", _no_params),
}


async def measure_sync(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Per case: the first refresh (backfill), the steady refresh and a refresh after ~1% changed, each
    alternated with the hand count (ABBA) on one pooled connection, entered/left checked by set arithmetic."""
    from app.db import make_engine, make_sessionmaker

    engine = make_engine(url, pool_size=1)  # one backend for every system, as in measure()
    try:
        makers = make_sessionmaker(engine)
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
            sessionmaker=makers, replica_sessionmaker=makers)))
        return {name: await _sync_case(args, engine, request, name, SYNC_CASES[name]) for name in args.sync_cases}
    finally:
        await engine.dispose()


async def _sync_case(args: argparse.Namespace, engine: Any, request: Any, name: str,
                     case: SyncCase) -> dict[str, Any]:
    from sqlalchemy import delete
    from sqlalchemy.dialects.postgresql import insert

    from app.db import bare_connection
    from app.models import Destination, Segment
    from app.services import segment_sync

    makers = request.app.state.sessionmaker

    async def sql(method: str, statement: str, *params: Any) -> Any:  # on the one pooled connection
        async with bare_connection(request) as connection:
            return await getattr(connection, method)(statement, *params)

    segment_id, destination_id = uuid.uuid4(), uuid.uuid4()
    async with makers.begin() as s:  # --reuse-db: the previous run's rows go first
        await s.execute(delete(Destination.__table__).where(Destination.__table__.c.name == SYNC_DESTINATION))
        await s.execute(delete(Segment.__table__).where(Segment.__table__.c.name == SYNC_SEGMENT_PREFIX + name))
        await s.execute(insert(Segment.__table__).values(
            id=segment_id, name=SYNC_SEGMENT_PREFIX + name, filter=case.filter, created_at=datetime.now(UTC),
            updated_at=datetime.now(UTC)))
        await s.execute(insert(Destination.__table__).values(
            id=destination_id, kind="webhook", name=SYNC_DESTINATION, enabled=True,
            config={"url": "https://hooks.example/x"}, list_mappings=[], field_mappings={},
            segment_mappings=[{"segment_id": str(segment_id), "remote_list_id": None, "tag": None}],
            consecutive_failures=0, version=1, created_at=datetime.now(UTC), updated_at=datetime.now(UTC)))
        await segment_sync.apply_mappings(s, destination_id, [segment_id])
    await sql("execute", "DELETE FROM outbox_message WHERE topic LIKE 'segment.%'")

    if case.count_sql is None:
        variants, best = await fastest_hand(lambda q, *p: sql("fetchval", q, *p))
        count_sql = HAND[best]
    else:
        variants, best, count_sql = {}, "given", case.count_sql
    n = len(case.params(datetime.now(UTC)))
    snapshot = f"SELECT contact_id AS id FROM segment_member WHERE destination_id = ${n + 1} AND segment_id = ${n + 2}"
    arithmetic = (f"WITH cur AS ({case.members_sql}), snap AS ({snapshot}) "
                  "SELECT (SELECT count(*) FROM cur) AS members, "
                  "(SELECT count(*) FROM (SELECT id FROM cur EXCEPT SELECT id FROM snap) e) AS entered, "
                  "(SELECT count(*) FROM (SELECT id FROM snap EXCEPT SELECT id FROM cur) l) AS left")

    async def expected(now: datetime) -> dict[str, int]:
        return dict(await sql("fetchrow", arithmetic, *case.params(now), destination_id, segment_id))

    async def count() -> int:
        return await sql("fetchval", count_sql, *case.params(datetime.now(UTC)))  # type: ignore[no-any-return]

    async def reset() -> None:  # the snapshot as never taken: the next refresh is a first one
        await sql("execute", f"DELETE FROM segment_member WHERE destination_id = '{destination_id}';"
                  f"UPDATE segment_sync SET refreshed_at = NULL, members = 0 WHERE destination_id = '{destination_id}';"
                  "DELETE FROM outbox_message WHERE topic LIKE 'segment.%'")
        await sql("execute", "VACUUM (ANALYZE) segment_member, outbox_message")

    async def toggle() -> dict[str, int]:  # ~1% of the members out, as many near-members in, one UPDATE
        members = (await expected(datetime.now(UTC)))["members"]
        k = max(1, round(members * 0.01))
        out = [r[0] for r in await sql(
            "fetch", f"SELECT contact_id FROM segment_member WHERE destination_id = $1 AND segment_id = $2 "
                     f"ORDER BY random() LIMIT {k}", destination_id, segment_id)]
        near = [r[0] for r in await sql("fetch", f"{case.near_sql} ORDER BY random() LIMIT {k}",
                                        *case.params(datetime.now(UTC)))]
        await sql("execute", TOGGLE_VIP, out, near)
        return {"tag_removed": len(out), "tag_added": len(near)}

    async def refresh(now: datetime, checked: dict[str, int]) -> tuple[float, dict[str, Any]]:
        last = await sql("fetchval", "SELECT coalesce(max(id), 0) FROM outbox_message")
        t = time.perf_counter()
        async with makers.begin() as s:  # what segment_sync.run_next does, minus the log line
            done = await segment_sync.refresh_next(s, every_seconds=0, now=now)
            before_commit = time.perf_counter()
        ms = (time.perf_counter() - t) * 1000
        commit_ms = (time.perf_counter() - before_commit) * 1000
        assert done is not None and done.segment_id == segment_id
        written = dict(await sql("fetch", "SELECT topic, count(*) FROM outbox_message WHERE id > $1 GROUP BY topic",
                                 last))
        after = await expected(now)
        got = {"members": done.members, "entered": done.entered, "left": done.left}
        ok = (got == checked and after["entered"] == after["left"] == 0
              and written.get("segment.entered", 0) == done.entered and written.get("segment.left", 0) == done.left)
        return ms, {**got, "expected": checked, "outbox": written, "ok": ok, "commit_ms": round(commit_ms, 3)}

    async def diff_sql(now: datetime, variant: str) -> tuple[float, dict[str, int]]:  # the statement, rolled back
        statement, params = await _compiled_diff(makers, engine, case.filter, destination_id, segment_id, now)
        async with bare_connection(request) as connection:
            transaction = connection.transaction()
            await transaction.start()
            t = time.perf_counter()
            row = await connection.fetchrow(DIFF_VARIANTS[variant](statement), *params)
            ms = (time.perf_counter() - t) * 1000
            await transaction.rollback()
        return ms, dict(zip(("members", "entered", "left"), row, strict=True))

    async def rounds(kind: str, runs: int, prepare: Callable[[], Any], *, variants: str = "") -> dict[str, Any]:
        """`variants`: "alternated" (with count and refresh, ABBA) or "before" (each round, before the refresh:
        rolled back, they must see the changes the refresh then applies; their results are checked too)."""
        times: dict[str, list[float]] = {k: [] for k in ["count", "refresh", *(DIFF_VARIANTS if variants else [])]}
        checks: list[dict[str, Any]] = []
        for r in range(runs):
            change = await prepare()
            now = datetime.now(UTC)
            checked = await expected(now)
            ab = list(times) if variants == "alternated" else ["count", "refresh"]
            first = [] if variants != "before" else list(DIFF_VARIANTS)
            order = first + (ab if r % 2 == 0 else list(reversed(ab)))  # AB BA ...
            load = os.getloadavg()[0]
            for system in order:
                if system == "refresh":
                    ms, check = await refresh(now, checked)
                    checks.append({**check, "change": change, "load1": load})
                elif system == "count":
                    t = time.perf_counter()
                    await count()
                    ms = (time.perf_counter() - t) * 1000
                else:
                    ms, got = await diff_sql(now, system)
                    checks.append({"variant": system, **got, "expected": checked, "ok": got == checked,
                                   "commit_ms": None})
                times[system].append(ms)
        result = {k: summary_p95(v) for k, v in times.items()}
        checks_refresh = [c for c in checks if "variant" not in c]
        result["refresh_commit"] = summary_p95([c["commit_ms"] for c in checks_refresh])  # part of `refresh`
        log(f"{name} {kind}: " + ", ".join(f"{k} p50 {v['p50_ms']:.1f} ms" for k, v in result.items())
            + f", refresh/count {result['refresh']['p50_ms'] / result['count']['p50_ms']:.2f}x, "
            f"all checks ok: {all(c['ok'] for c in checks)}")
        return {"results": result, "ratio_refresh_over_count": round(
            result["refresh"]["p50_ms"] / result["count"]["p50_ms"], 2), "runs": times, "checks": checks,
            "all_ok": all(c["ok"] for c in checks)}

    async def nothing() -> None:
        return None

    report: dict[str, Any] = {"filter": case.filter, "hand_variants": variants, "hand_best": best,
                              "hand_sql": count_sql.strip(), "load_before": os.getloadavg()}
    await reset()
    report["first_plan"] = await _explain_diff(makers, engine, request, case.filter, destination_id, segment_id)
    report["first"] = await rounds("first refresh", args.sync_first_runs, reset)
    report["outbox_rows_after_first"] = await sql(
        "fetchval", "SELECT count(*) FROM outbox_message WHERE topic = 'segment.entered'")
    await sql("execute", "VACUUM (ANALYZE) segment_member, outbox_message")  # as autovacuum would, soon after
    for _ in range(args.warmup):
        await refresh(datetime.now(UTC), await expected(datetime.now(UTC)))
        await count()
    report["steady"] = await rounds("steady refresh", args.runs, nothing, variants="alternated")
    report["steady_plans"] = {variant: await _explain_diff(makers, engine, request, case.filter, destination_id,
                                                           segment_id, variant) for variant in DIFF_VARIANTS}
    report["changed"] = await rounds("refresh after ~1% changed", args.sync_change_runs, toggle, variants="before")
    report["second_destination_unanalyzed"] = await _second_destination_unanalyzed(
        engine, request, case.filter, segment_id, timeout_s=args.sync_timeout)
    report["load_after"] = os.getloadavg()
    return report


async def _second_destination_unanalyzed(engine: Any, request: Any, filter_: dict[str, Any], segment_id: uuid.UUID,
                                         *, timeout_s: int) -> dict[str, Any]:
    """A second destination maps the segment; its first refresh fills its snapshot, and its next refresh runs
    before ANALYZE has seen those rows (autovacuum off on segment_member meanwhile: analyzes come when 10% of
    the table changed, so a new snapshot in a big table waits long). Each diff variant is then timed on it,
    rolled back, under a statement_timeout; then once more after ANALYZE. Custom plans, as a worker connection
    gets for its first five executions of a statement (after that PostgreSQL may keep a generic plan)."""
    from app.db import bare_connection
    from app.services import segment_sync

    makers = request.app.state.sessionmaker
    second = uuid.uuid4()
    out: dict[str, Any] = {"timeout_s": timeout_s}
    async with bare_connection(request) as connection:
        await connection.execute(
            "INSERT INTO destination (id, kind, name, enabled, config, list_mappings, field_mappings, segment_mappings,"
            " consecutive_failures, version, created_at, updated_at) VALUES ($1, 'webhook', $2, true, "
            "'{\"url\": \"https://hooks.example/y\"}', '[]', '{}', '[]', 0, 1, now(), now())",
            second, SYNC_DESTINATION + " (second)")
        await connection.execute("UPDATE segment_sync SET refreshed_at = now() + interval '1 day'")  # others not due
        await connection.execute("INSERT INTO segment_sync (destination_id, segment_id) VALUES ($1, $2)", second,
                                 segment_id)
        await connection.execute("ALTER TABLE segment_member SET (autovacuum_enabled = false); ANALYZE segment_member")
    try:
        async with makers.begin() as s:
            done = await segment_sync.refresh_next(s, every_seconds=0)
        assert done is not None and done.destination_id == second
        out["first_refresh_members"] = done.members
        for stats in ("before_analyze", "after_analyze"):
            if stats == "after_analyze":
                async with bare_connection(request) as connection:
                    await connection.execute("ANALYZE segment_member")
            statement, params = await _compiled_diff(makers, engine, filter_, second, segment_id, datetime.now(UTC))
            for variant, rewrite in DIFF_VARIANTS.items():
                async with bare_connection(request) as connection:
                    transaction = connection.transaction()
                    await transaction.start()
                    await connection.execute(f"SET LOCAL statement_timeout = '{timeout_s}s'; "
                                             "SET LOCAL plan_cache_mode = force_custom_plan")
                    t = time.perf_counter()
                    try:
                        await connection.fetchrow(rewrite(statement), *params)
                        out[f"{stats}_{variant}_ms"] = round((time.perf_counter() - t) * 1000, 1)
                    except asyncpg.QueryCanceledError:
                        out[f"{stats}_{variant}_ms"] = f"> {timeout_s * 1000} (cancelled)"
                    await transaction.rollback()
        log(f"second destination, unanalyzed snapshot: {out}")
        return out
    finally:
        async with bare_connection(request) as connection:
            await connection.execute("ALTER TABLE segment_member RESET (autovacuum_enabled)")
            await connection.execute("DELETE FROM destination WHERE id = $1", second)


def summary_p95(ms: list[float]) -> dict[str, float]:
    return {**summary(ms), "p95_ms": round(pct(ms, 0.95), 3)}


async def _compiled_diff(makers: Any, engine: Any, filter_: dict[str, Any], destination_id: uuid.UUID,
                         segment_id: uuid.UUID, now: datetime) -> tuple[str, list[Any]]:
    """segment_sync's diff statement as asyncpg runs it: SQL text and positional parameters."""
    from app.services import segment_sync, segments

    async with makers() as s:
        condition = await segments.compile_filter(s, filter_, now=now)
    statement = segment_sync._diff_statement(destination_id, segment_id, condition, now)
    compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
    return compiled.string, [compiled.params[k] for k in compiled.positiontup]  # type: ignore[union-attr]


def _prefiltered(statement: str) -> str:
    """A scratch variant of the diff statement (not Carnet's): `entered` inserts only the people the snapshot
    lacks (an anti-join), instead of offering every member to ON CONFLICT DO NOTHING (kept, for races)."""
    entered = re.compile(r"SELECT (\$\d+)::UUID AS anon_\d+, (\$\d+)::UUID AS anon_\d+, current\.id AS id, "
                         r"(.*?)\s+FROM current ON CONFLICT DO NOTHING", re.S)
    assert len(entered.findall(statement)) == 1, "the diff statement changed shape: update _prefiltered"
    return entered.sub(
        r"SELECT \1::UUID, \2::UUID, current.id, \3 FROM current WHERE NOT EXISTS (SELECT FROM segment_member AS s "
        r"WHERE s.destination_id = \1::UUID AND s.segment_id = \2::UUID AND s.contact_id = current.id) "
        r"ON CONFLICT DO NOTHING", statement)


def _full_join(statement: str) -> str:
    """A scratch variant of the diff statement (not Carnet's): the current answer and the snapshot meet ONCE, in
    a full join (`changed`: hash or merge, never a nested loop, whatever the estimates); `entered` inserts its
    new ids, `left` deletes its gone ids by primary key (an array, so no join to misplan either)."""
    pattern = re.compile(
        r"entered AS \n\(INSERT INTO segment_member \(destination_id, segment_id, contact_id, entered_at\) "
        r"SELECT (\$\d+)::UUID AS anon_\d+, (\$\d+)::UUID AS anon_\d+, current\.id AS id, (.*?)\s+FROM current "
        r"ON CONFLICT DO NOTHING RETURNING segment_member\.contact_id\), \n\"left\" AS \n\(DELETE FROM segment_member "
        r"WHERE segment_member\.destination_id = (\$\d+::UUID) AND segment_member\.segment_id = (\$\d+::UUID) AND "
        r"NOT \(EXISTS \(SELECT \* \nFROM current \nWHERE current\.id = segment_member\.contact_id\)\) RETURNING", re.S)
    assert len(pattern.findall(statement)) == 1, "the diff statement changed shape: update _full_join"
    return pattern.sub(
        r"changed AS (SELECT current.id AS entering, s.contact_id AS leaving FROM current FULL JOIN "
        r"(SELECT contact_id FROM segment_member WHERE destination_id = \4 AND segment_id = \5) AS s "
        r"ON s.contact_id = current.id WHERE current.id IS NULL OR s.contact_id IS NULL), "
        r"entered AS (INSERT INTO segment_member (destination_id, segment_id, contact_id, entered_at) "
        r"SELECT \1::UUID, \2::UUID, entering, \3 FROM changed WHERE entering IS NOT NULL "
        r"ON CONFLICT DO NOTHING RETURNING segment_member.contact_id), "
        r'"left" AS (DELETE FROM segment_member WHERE destination_id = \4 AND segment_id = \5 '
        r"AND contact_id = ANY (ARRAY(SELECT leaving FROM changed WHERE leaving IS NOT NULL)) RETURNING", statement)


DIFF_VARIANTS: dict[str, Callable[[str], str]] = {
    "diff_sql": lambda statement: statement,   # Carnet's statement alone
    "diff_prefiltered": _prefiltered,
    "diff_full_join": _full_join,
}


async def _explain_diff(makers: Any, engine: Any, request: Any, filter_: dict[str, Any],
                        destination_id: uuid.UUID, segment_id: uuid.UUID, variant: str = "diff_sql") -> str:
    from app.db import bare_connection

    statement, params = await _compiled_diff(makers, engine, filter_, destination_id, segment_id, datetime.now(UTC))
    statement = DIFF_VARIANTS[variant](statement)
    async with bare_connection(request) as connection:
        transaction = connection.transaction()
        await transaction.start()
        rows = await connection.fetch("EXPLAIN (ANALYZE, BUFFERS) " + statement, *params)
        await transaction.rollback()
    return "\n".join(r[0] for r in rows)


async def main() -> int:
    args = parse_args()
    url = f"{args.pg}/{args.db}"
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/bench_segments.py", *sys.argv[1:]]),
        "started_at": datetime.now(UTC).isoformat(), "host": platform.node(),
        "requested": {"contacts": args.contacts, "orders": args.orders, "events": args.events},
    }
    try:
        if not args.reuse_db:
            log(f"creating {args.db}")
            await recreate_db(args)
            from app.migrations import upgrade
            await asyncio.to_thread(upgrade, url)
            await make_event_months(url)
            conn = await asyncpg.connect(url)
            try:
                t = time.perf_counter()
                report["generation_s"] = await generate(conn, args)
                report["generation_s"]["total"] = round(time.perf_counter() - t, 1)
            finally:
                await conn.close()
            log(f"generation total {report['generation_s']['total']:.0f} s")
        if args.phase in ("count", "all"):
            report.update(await measure(args, url))
        if args.phase in ("sync", "all"):
            sync = {"command": report["command"], "started_at": datetime.now(UTC).isoformat(),
                    "cases": await measure_sync(args, url)}
    finally:
        if not args.keep_db:
            await drop_db(args)
            log(f"dropped {args.db}")
    OUT.mkdir(parents=True, exist_ok=True)
    ok = True
    if args.phase in ("count", "all"):
        (OUT / "segments.json").write_text(json.dumps(report, indent=2, default=str))
        ok = print_count(report)
    if args.phase in ("sync", "all"):
        (OUT / "segment_sync.json").write_text(json.dumps(sync, indent=2, default=str))
        ok = print_sync(sync["cases"]) and ok
    return 0 if ok else 1


def print_count(report: dict[str, Any]) -> bool:
    r = report["results"]
    print()
    print(f"sizes: {report['sizes']}")
    print(f"counts: {report['counts']}  match={report['counts_match']}")
    print(f"{'system':<12}{'p50 ms':>10}{'p90 ms':>10}{'min ms':>10}")
    for k, v in r.items():
        print(f"{k:<12}{v['p50_ms']:>10.2f}{v['p90_ms']:>10.2f}{v['min_ms']:>10.2f}")
    print(f"carnet/hand = {report['ratio_carnet_over_hand']:.2f}x (target <= {TARGET_RATIO}x: "
          f"{'met' if report['meets_target'] else 'MISSED'}); carnet_sql/hand = "
          f"{report['ratio_carnet_sql_over_hand']:.2f}x")
    for k, v in report["plans"].items():
        print(f"\n--- EXPLAIN {k}\n{v}")
    print(f"\nwrote {OUT / 'segments.json'}")
    return bool(report["counts_match"])


def print_sync(cases: dict[str, Any]) -> bool:
    for name, case in cases.items():
        print(f"\n=== segment sync: {name} (hand count: {case['hand_best']}; load {case['load_before']} -> "
              f"{case['load_after']})")
        print(f"{'phase':<10}{'system':<16}{'p50 ms':>10}{'p95 ms':>10}{'min ms':>10}{'n':>4}  refresh/count  checks")
        for phase in ("first", "steady", "changed"):
            for system, v in case[phase]["results"].items():
                print(f"{phase:<10}{system:<16}{v['p50_ms']:>10.2f}{v['p95_ms']:>10.2f}{v['min_ms']:>10.2f}{v['n']:>4}"
                      + (f"  {case[phase]['ratio_refresh_over_count']:>12.2f}x  "
                         f"{'ok' if case[phase]['all_ok'] else 'MISMATCH'}" if system == "refresh" else ""))
        for phase in ("first", "changed"):
            last = [c for c in case[phase]["checks"] if "variant" not in c][-1]
            print(f"{phase}: last refresh members={last['members']} entered={last['entered']} left={last['left']} "
                  f"expected={last['expected']} outbox={last['outbox']}")
        print(f"outbox rows after the first refresh: {case['outbox_rows_after_first']}")
        print(f"second destination, its snapshot not yet analyzed: {case['second_destination_unanalyzed']}")
        print(f"\n--- EXPLAIN first refresh statement ({name}, rolled back)\n{case['first_plan']}")
        for variant, plan in case["steady_plans"].items():
            print(f"\n--- EXPLAIN steady refresh, {variant} ({name}, rolled back)\n{plan}")
    print(f"\nwrote {OUT / 'segment_sync.json'}")
    return all(case[phase]["all_ok"] for case in cases.values() for phase in ("first", "steady", "changed"))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
