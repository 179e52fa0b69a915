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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import uuid
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
        WHERE lower(c.city) = $1 AND c.tags @> ARRAY['vip']::text[]
          AND (SELECT count(*) FROM "order" o
               WHERE o.contact_id = c.id AND o.placed_at >= $2
                 AND o.status NOT IN ('cancelled', 'refunded')) >= 2""",
    "exists_offset_1": """
        SELECT count(*) FROM contact c
        WHERE lower(c.city) = $1 AND c.tags @> ARRAY['vip']::text[]
          AND EXISTS (SELECT 1 FROM "order" o
                      WHERE o.contact_id = c.id AND o.placed_at >= $2
                        AND o.status NOT IN ('cancelled', 'refunded')
                      OFFSET 1)""",
    "join_group_having": """
        SELECT count(*) FROM (
          SELECT c.id FROM contact c JOIN "order" o ON o.contact_id = c.id
          WHERE lower(c.city) = $1 AND c.tags @> ARRAY['vip']::text[]
            AND o.placed_at >= $2 AND o.status NOT IN ('cancelled', 'refunded')
          GROUP BY c.id HAVING count(*) >= 2) s""",
    "orders_first_having": """
        SELECT count(*) FROM contact c
        JOIN (SELECT contact_id FROM "order"
              WHERE placed_at >= $2 AND status NOT IN ('cancelled', 'refunded')
              GROUP BY contact_id HAVING count(*) >= 2) o ON o.contact_id = c.id
        WHERE lower(c.city) = $1 AND c.tags @> ARRAY['vip']::text[]""",
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
        await conn.execute(i["indexdef"])
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


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from sqlalchemy import delete, func, select
    from sqlalchemy.dialects.postgresql import insert

    from app.db import bare_connection, make_engine, make_read_sessionmaker, make_sessionmaker
    from app.models import Contact, Segment
    from app.services import segments

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
            async with bare_connection(request, replica=True) as connection:  # type: ignore[arg-type]
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

        # -- pick the fastest hand variant (1 warm-up + 7 runs each, interleaved)
        for sql in HAND.values():
            await pooled(sql, CITY.lower(), cutoff)
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
            conn = await asyncpg.connect(url)
            try:
                t = time.perf_counter()
                report["generation_s"] = await generate(conn, args)
                report["generation_s"]["total"] = round(time.perf_counter() - t, 1)
            finally:
                await conn.close()
            log(f"generation total {report['generation_s']['total']:.0f} s")
        report.update(await measure(args, url))
    finally:
        if not args.keep_db:
            await drop_db(args)
            log(f"dropped {args.db}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "segments.json").write_text(json.dumps(report, indent=2, default=str))
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
    return 0 if report["counts_match"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
