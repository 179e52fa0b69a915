"""Behaviour events at volume: `POST /v1/events/batch` vs a raw COPY of the same rows, and the 30-day events
segment count vs the best hand-written SQL, side by side, in one run (issue 18).

    .venv/bin/python bench/bench_events.py [--events 10000000] [--contacts 200000] [--clients 4]
                                           [--api-workers 2] [--months 12] [--runs 20] [--db NAME] [--keep-db]
                                           [--counts-only]

What it does:
  1. (Re)creates the database `carnet_bench_events` (or --db NAME), runs Carnet's migrations, inserts
     --contacts contacts (external_id `c<n>`), and gives `event` the partitions of the last --months months
     (as the worker's upkeep would have made them over a year: app.services.event_partitions.ensure_month).
  2. Generates --events events, deterministically, as visits of 5 events each by one contact (by external_id;
     skewed: a fifth of the contacts make half the visits), each a type (page_view 55%, product_view 25%,
     search 10%, cart_add 7%, cart_abandoned 2%, form_submitted 1%), visits spread over the --months months,
     a unique event_id, small properties.
  3. Floor: `psql \\copy event (...) FROM file CSV` of the same rows (contact ids already resolved) into the same
     partitioned table, wall time. Then `event` and `event_key` are emptied.
  4. Carnet: `uvicorn app.main:create_app --workers --api-workers`; --clients concurrent HTTP clients send the
     events in batches of 1,000 to `POST /v1/events/batch` (bodies written to a file with the CSV, before
     anything is timed; the client's CPU, on the same cores, is reported). Every item must come back `created`;
     `event` and `event_key` must hold --events rows each. Wall time from the first request to the last answer.
  5. Segment counts (after VACUUM ANALYZE): `events.type eq <t> within_days 30` for a rare type
     (cart_abandoned) and a common one (page_view), counted exactly as GET /v1/segments/{id}/count does
     (`segments.count_stored` on a connection of the costly-read pool, built as the app builds it:
     app.timeouts.costly_connection), and its compiled SQL alone (`carnet_sql`, in the form count_stored
     chooses: by a sort or by a hash) and the form by a sort alone (`carnet_sql_by_sort`, the only form before
     that choice) on the pooled connection of the hand-written SQL, vs the fastest of four hand-written SQL
     variants; answers must be equal; --runs alternated measurements (ABCD DCBA), p50s.
  6. What `event_key` costs: PostgreSQL backend CPU per 1,000 events for a binary COPY, the event insert alone,
     the key insert alone and Carnet's statement (both), interleaved on one connection (--key-rounds batches each).
  7. Prints the ratios (bars: batch <= 3x the COPY; count <= 1.2x the hand SQL), writes bench/out/events.json,
     drops the database unless --keep-db.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.procfs import DbCpu  # noqa: E402

OUT = ROOT / "bench" / "out"

BATCH = 1000
SESSION = 5  # events per visit (a page, a product, a search, ...: what a shop's tracker sends)
BAR_INGEST, BAR_COUNT = 3.0, 1.2
TYPES = [("page_view", 55), ("product_view", 25), ("search", 10), ("cart_add", 7), ("cart_abandoned", 2),
         ("form_submitted", 1)]
TYPE_OF = [name for name, weight in TYPES for _ in range(weight)]  # 100 slots
COUNTED_TYPES = ("cart_abandoned", "page_view")
HAND = {  # $1 = type, $2 = cutoff
    "exists": "SELECT count(*) FROM contact c WHERE EXISTS (SELECT 1 FROM event e WHERE e.contact_id = c.id "
              "AND e.type = $1 AND e.occurred_at >= $2)",
    "count_distinct": "SELECT count(DISTINCT contact_id) FROM event WHERE type = $1 AND occurred_at >= $2",
    "distinct_subquery": "SELECT count(*) FROM (SELECT DISTINCT contact_id FROM event "
                         "WHERE type = $1 AND occurred_at >= $2) s",
    "in_semijoin": "SELECT count(*) FROM contact WHERE id IN (SELECT contact_id FROM event "
                   "WHERE type = $1 AND occurred_at >= $2)",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def events(count: int, contacts: int, months: int, now: datetime) -> Iterator[tuple[int, str, str, datetime, str]]:
    """(n, external_id, type, occurred_at, properties JSON), the same on every call: visits of SESSION events,
    each by one contact (a fifth of the contacts make half the visits) from a moment spread over the months."""
    span = months * 30 * 86_400
    hot = max(1, contacts // 5)
    for i in range(count):
        visit, step = divmod(i, SESSION)
        who = (visit * 7919) % hot if visit % 2 else (visit * 104_729) % contacts
        at = now - timedelta(seconds=(visit * 2_654_435_761) % span + 3600 - 30 * step)
        props = json.dumps({"path": f"/p/{i % 5000}", "session": f"s{visit}"})
        yield i, f"c{who}", TYPE_OF[(i * 37) % 100], at, props


async def setup(url: str, args: argparse.Namespace) -> dict[str, uuid.UUID]:
    from app.db import make_engine, make_sessionmaker
    from app.services.event_partitions import add_months, ensure_month, month_of

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("""
            INSERT INTO contact (id, external_id, email, email_status, kind, lifecycle_stage, attributes, tags,
                                 orders_count, total_spent, version, created_at, updated_at, source)
            SELECT gen_random_uuid(), 'c' || g, 'c' || g || '@bench-mail.com', 'unverified', 'prospect',
                   'prospect', '{}', '{}', 0, 0, 1, now(), now(), 'api'
            FROM generate_series(0, $1 - 1) g""", args.contacts)
        ids = {r["external_id"]: r["id"] for r in await conn.fetch("SELECT external_id, id FROM contact")}
        await conn.execute("VACUUM ANALYZE contact")
    finally:
        await conn.close()
    engine = make_engine(url, pool_size=1)
    async with make_sessionmaker(engine).begin() as session:
        for back in range(args.months + 1):
            await ensure_month(session, add_months(month_of(datetime.now(UTC)), -back))
    await engine.dispose()
    return ids


def write_files(copy_path: Path, bodies_path: Path, args: argparse.Namespace, ids: dict[str, uuid.UUID],
                now: datetime) -> None:
    """The same events twice, before anything is timed: a CSV for the COPY (contact ids resolved), and the
    batches' JSON bodies, one a line (a back office sends from its own machine: building them is not Carnet's
    time, and on these 2 cores it would take CPU from the server under test)."""
    created = now.isoformat()
    batch: list[dict[str, Any]] = []
    with copy_path.open("w") as out, bodies_path.open("wb") as bodies:
        for n, external_id, type_, at, props in events(args.events, args.contacts, args.months, now):
            escaped = props.replace('"', '""')
            out.write(f'bench-{n},{ids[external_id]},{type_},{at.isoformat()},"{escaped}",{created}\n')
            batch.append({"contact": {"external_id": external_id}, "type": type_, "occurred_at": at.isoformat(),
                          "event_id": f"bench-{n}", "properties": json.loads(props)})
            if len(batch) == BATCH:
                bodies.write(json.dumps({"items": batch}).encode() + b"\n")
                batch = []
        if batch:
            bodies.write(json.dumps({"items": batch}).encode() + b"\n")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (the API's uvicorn workers)."""
    try:
        root = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0.0


def raw_copy(url: str, path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-c",
                    f"\\copy event (event_id, contact_id, type, occurred_at, properties, created_at) "
                    f"FROM '{path}' WITH (FORMAT csv)"], check=True)
    return time.perf_counter() - started


async def sql(url: str, *statements: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return [await conn.fetchval(s) for s in statements]
    finally:
        await conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(url: str, secret: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "JWT_SECRET": secret, "LOG_LEVEL": "WARNING",
           "RATE_LIMIT_PER_SECOND": "1000000", "RATE_LIMIT_BURST": "1000000", "RUN_WORKER_IN_API": "false"}
    OUT.mkdir(exist_ok=True)
    handle = (OUT / "server_events.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1", "--port",
         str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
        cwd=OUT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API exited; see {OUT / 'server_events.log'}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the API was not ready after 90 s")


async def post_all(base: str, token: str, args: argparse.Namespace, bodies_path: Path) -> dict[str, Any]:
    """The batches to `POST /v1/events/batch` from --clients connections at once; every item must be created."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    created = 0

    async def client(http: httpx.AsyncClient, bodies: Iterator[bytes]) -> None:
        nonlocal created
        for body in bodies:
            response = await http.post("/v1/events/batch", content=body, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"batch answered {response.status_code}: {response.text[:500]}")
            created += response.content.count(b'"status":"created"')  # checked against the tables afterwards

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    with bodies_path.open("rb") as lines:
        bodies = iter(lines)  # one shared iterator: each client takes the next batch
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
            started = time.perf_counter()
            await asyncio.gather(*(client(http, bodies) for _ in range(args.clients)))
            seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {"seconds": seconds, "created": created, "client_cpu_seconds": round(client_cpu, 1)}


async def counts(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import insert

    from app.db import bare_connection, make_engine, make_read_sessionmaker, make_sessionmaker
    from app.models import Segment
    from app.services import segments
    from app.timeouts import StatementTimeouts, costly_connection, make_costly_engine

    engine = make_engine(url, pool_size=1)  # one backend for the hand SQL and Carnet's SQL alone
    timeouts = StatementTimeouts(interactive=10, costly=30, export=3600, worker=600)
    costly_engine = make_costly_engine(url, timeouts, pool_size=1, pool_timeout=5)  # the endpoint's, as the app's
    makers, readers = make_sessionmaker(engine), make_read_sessionmaker(engine)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        sessionmaker=makers, replica_sessionmaker=readers, costly_sessionmaker=make_sessionmaker(costly_engine),
        timeouts=timeouts)))
    out: dict[str, Any] = {}
    try:
        for type_ in COUNTED_TYPES:
            segment_id = uuid.uuid4()
            filter_ = {"all": [{"field": "events.type", "op": "eq", "value": type_, "within_days": 30}]}
            async with makers.begin() as s:
                await s.execute(insert(Segment.__table__).values(  # type: ignore[attr-defined]
                    id=segment_id, name=f"bench events {type_} {segment_id}", filter=filter_, description=None,
                    created_at=datetime.now(UTC),
                    updated_at=datetime.now(UTC)))

            async def carnet(segment_id: uuid.UUID = segment_id) -> int:  # GET /v1/segments/{id}/count, minus HTTP
                async with costly_connection(request, kind="a count") as connection:  # type: ignore[arg-type]
                    return await segments.count_stored(connection, segment_id)

            def hand_of(query: str, type_: str = type_) -> Callable[[], Awaitable[int]]:
                async def run() -> int:
                    async with bare_connection(request, replica=True) as connection:  # type: ignore[arg-type]
                        return int(await connection.fetchval(query, type_, datetime.now(UTC) - timedelta(days=30)))
                return run

            compiled = segments._compile(filter_, {}, datetime.now(UTC))
            by_sort = segments._Statement.of(compiled.counting(), compiled.clock)  # the only form before s19
            async with bare_connection(request, replica=True) as connection:  # type: ignore[arg-type]
                hashed = await segments._hashes_better(connection, by_sort, datetime.now(UTC))  # as count_stored
                estimate = await segments._sort_estimate(connection, by_sort, datetime.now(UTC))
            statement = segments._Statement.of(compiled.counting(hashed), compiled.clock)

            def sql_of(statement: Any) -> Callable[[], Awaitable[int]]:  # a compiled SQL alone, no `within`
                async def run() -> int:
                    async with bare_connection(request, replica=True) as connection:  # type: ignore[arg-type]
                        return int(await connection.fetchval(statement.sql, *statement.arguments(datetime.now(UTC))))
                return run

            carnet_sql, carnet_sql_by_sort = sql_of(statement), sql_of(by_sort)
            async with bare_connection(request, replica=True) as connection:  # type: ignore[arg-type]
                rows = await connection.fetchval("SELECT count(*) FROM event WHERE type = $1 AND occurred_at >= $2",
                                                 type_, datetime.now(UTC) - timedelta(days=30))
            variants = {name: await _p50(hand_of(query), 3) for name, query in HAND.items()}
            best = min(variants, key=lambda k: variants[k][0])
            hand = hand_of(HAND[best])
            answers = {"carnet": await carnet(), "carnet_sql": await carnet_sql(),
                       "carnet_sql_by_sort": await carnet_sql_by_sort(), **{name: v[1] for name, v in variants.items()}}
            # the form before this choice (always by a sort) alternated with the rest: old and new side by side
            systems = {"carnet": carnet, "carnet_sql": carnet_sql, "carnet_sql_by_sort": carnet_sql_by_sort,
                       "hand": hand}
            times: dict[str, list[float]] = {name: [] for name in systems}
            for r in range(args.runs):
                for name in (list(systems) if r % 2 == 0 else list(reversed(systems))):  # ABCD DCBA ...
                    started = time.perf_counter()
                    await systems[name]()
                    times[name].append((time.perf_counter() - started) * 1000)
            p50 = {k: statistics.median(v) for k, v in times.items()}
            out[type_] = {"answers": answers, "answers_match": len(set(answers.values())) == 1,
                          "hand_variants_p50_ms": {k: round(v[0], 2) for k, v in variants.items()},
                          "hand_best": best, "hand_sql": HAND[best], "carnet_sql": statement.sql,
                          "carnet_form": "hash" if hashed else "sort",
                          "estimated_rows_work_mem": estimate, "rows_in_window": rows,
                          "carnet_endpoint_form": "hash" if segments._cached_counts[segment_id].hashed else "sort",
                          "carnet_p50_ms": round(p50["carnet"], 2), "carnet_sql_p50_ms": round(p50["carnet_sql"], 2),
                          "carnet_sql_by_sort_p50_ms": round(p50["carnet_sql_by_sort"], 2),
                          "hand_p50_ms": round(p50["hand"], 2), "ratio": round(p50["carnet"] / p50["hand"], 3),
                          "ratio_sql_alone": round(p50["carnet_sql"] / p50["hand"], 3),
                          "ratio_sql_by_sort": round(p50["carnet_sql_by_sort"] / p50["hand"], 3)}
            log(f"count {type_}: {out[type_]}")
    finally:
        await engine.dispose()
        await costly_engine.dispose()
    return out


KEY_COST_SQL = {  # a batch of 1,000: event_ids, contact ids, types, moments, properties (the key: ids and moments)
    "event_only": "INSERT INTO event (event_id, contact_id, type, occurred_at, properties, created_at) "
                  "SELECT e, c, t, o, CAST(p AS jsonb), now() FROM unnest($1::varchar[], $2::uuid[], $3::varchar[], "
                  "$4::timestamptz[], $5::text[]) AS g(e, c, t, o, p)",
    "key_only": "INSERT INTO event_key (event_id, id, occurred_at) SELECT e, nextval(pg_get_serial_sequence("
                "'event', 'id')), o FROM unnest($1::varchar[], $2::timestamptz[]) AS g(e, o) ON CONFLICT DO NOTHING",
}


async def key_cost(url: str, ids: dict[str, uuid.UUID], rounds: int) -> dict[str, float]:
    """What `event_key` costs: PostgreSQL backend CPU per 1,000 events for a binary COPY into `event`, the event
    insert alone, the key insert alone, and Carnet's statement (both), side by side on one connection (rounds
    interleaved; CPU read from /proc, which counts in 10 ms ticks: hence averages over many rounds)."""
    from app.services.events import _STORE

    store = _STORE.format(columns="stored.id")
    for n, name in enumerate(("ns", "event_ids", "contact_ids", "types", "occurred", "properties", "now"), 1):
        store = store.replace(f":{name}", f"${n}")
    conn = await asyncpg.connect(url)
    await conn.set_type_codec("jsonb", encoder=lambda v: b"\x01" + v.encode(), decoder=lambda v: v,
                              schema="pg_catalog", format="binary")
    backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
    contacts = list(ids.values())
    now = datetime.now(UTC)

    def rows(tag: str) -> list[tuple[Any, ...]]:
        return [(f"cost-{tag}-{i}", contacts[(i // SESSION * 7919) % len(contacts)], "page_view",
                 now - timedelta(minutes=i * 7), json.dumps({"path": f"/p/{i}"})) for i in range(BATCH)]

    async def run(name: str, batch: list[tuple[Any, ...]]) -> None:
        columns = [list(c) for c in zip(*batch, strict=True)]
        if name == "copy":
            await conn.copy_records_to_table("event", records=[(*r, now) for r in batch], columns=[
                "event_id", "contact_id", "type", "occurred_at", "properties", "created_at"])
        elif name == "carnet_store":
            await conn.fetch(store, list(range(BATCH)), *columns, now)
        elif name == "key_only":
            await conn.execute(KEY_COST_SQL[name], columns[0], columns[3])
        else:
            await conn.execute(KEY_COST_SQL[name], *columns)

    spent: dict[str, float] = {"copy": 0.0, "event_only": 0.0, "key_only": 0.0, "carnet_store": 0.0}
    try:
        for r in range(rounds):
            for name in spent:
                batch = rows(f"{name}-{r}")
                before = sum(backend.cpu_times()[:2])
                await run(name, batch)
                spent[name] += sum(backend.cpu_times()[:2]) - before
    finally:
        await conn.close()
    return {name: round(total / rounds * 1000, 1) for name, total in spent.items()}


async def _p50(call: Callable[[], Awaitable[int]], runs: int) -> tuple[float, int]:
    times, answer = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        answer = await call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), answer


async def recreate(server: str, db: str, *, drop_only: bool = False) -> str:
    admin = await asyncpg.connect(server.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    if not drop_only:
        await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.close()
    return server.rsplit("/", 1)[0] + f"/{db}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--contacts", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--key-rounds", type=int, default=40, help="batches per system in the event_key cost phase")
    parser.add_argument("--server", default=os.environ.get("BENCH_DATABASE_URL",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--db", default="carnet_bench_events", help="the bench database (dropped and recreated)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--counts-only", action="store_true",
                        help="only step 5, on the events of a database kept by an earlier run (--keep-db)")
    args = parser.parse_args()
    if args.counts_only:
        url = args.server.rsplit("/", 1)[0] + f"/{args.db}"
        load_before = os.getloadavg()[0]
        segment_counts = asyncio.run(counts(url, args))
        print(json.dumps({"segment_counts": segment_counts, "load_1m": [load_before, os.getloadavg()[0]]}, indent=2))
        return
    from app.migrations import upgrade
    from app.security import Role
    from app.security.tokens import issue_access_token

    load_before = os.getloadavg()[0]
    now = datetime.now(UTC)
    url = asyncio.run(recreate(args.server, args.db))
    upgrade(url)
    ids = asyncio.run(setup(url, args))
    log(f"database {args.db}: {args.contacts} contacts, partitions for the last {args.months} months")

    workdir = Path(tempfile.mkdtemp(prefix="carnet-bench-events-"))
    path, bodies_path = workdir / "events.csv", workdir / "batches.jsonl"
    write_files(path, bodies_path, args, ids, now)
    asyncio.run(sql(url, "CHECKPOINT"))
    with DbCpu(args.db) as copy_pg:
        copy_s = raw_copy(url, path)
    copied = asyncio.run(sql(url, "SELECT count(*) FROM event"))[0]
    log(f"raw COPY of {copied} events into the partitioned table: {copy_s:.2f} s")
    path.unlink()
    asyncio.run(sql(url, "TRUNCATE event, event_key", "CHECKPOINT"))

    secret = secrets.token_urlsafe(40)
    token = issue_access_token(secret, subject="bench", role=Role.INTEGRATION, ttl_seconds=24 * 3600).token
    proc, base = start_api(url, secret, args.api_workers)
    try:
        api_before = tree_cpu(proc.pid)
        with DbCpu(args.db) as carnet_pg:
            posted = asyncio.run(post_all(base, token, args, bodies_path))
        api_cpu = tree_cpu(proc.pid) - api_before
    finally:
        proc.terminate()
        proc.wait(30)
        bodies_path.unlink()
        workdir.rmdir()
    stored, keys = asyncio.run(sql(url, "SELECT count(*) FROM event", "SELECT count(*) FROM event_key"))
    log(f"Carnet: {args.events} events in batches of {BATCH} by {args.clients} clients to {args.api_workers} API "
        f"processes: {posted['seconds']:.2f} s; created {posted['created']}; stored {stored}, keys {keys}")
    if posted["created"] != args.events or stored != args.events or keys != args.events:
        raise SystemExit("Carnet did not store every event exactly once: the numbers mean nothing")

    asyncio.run(sql(url, "VACUUM ANALYZE event", "VACUUM ANALYZE contact"))
    segment_counts = asyncio.run(counts(url, args))
    key_ms = asyncio.run(key_cost(url, ids, args.key_rounds))
    log(f"PostgreSQL backend CPU ms per 1,000 events: {key_ms}")
    result = {
        "events": args.events, "contacts": args.contacts, "months": args.months, "clients": args.clients,
        "api_workers": args.api_workers, "batch": BATCH,
        "raw_copy_seconds": round(copy_s, 2), "carnet_seconds": round(posted["seconds"], 2),
        "ratio_ingest": round(posted["seconds"] / copy_s, 2), "bar_ingest": BAR_INGEST,
        "carnet_events_per_second": round(args.events / posted["seconds"]),
        # CPU seconds: the bench database's backends (sampled), the API processes, this script's client
        "cpu_seconds": {"raw_copy": {"postgres": copy_pg.seconds},
                        "carnet": {"postgres": carnet_pg.seconds, "api": round(api_cpu, 1),
                                   "bench_client": posted["client_cpu_seconds"]}},
        "ratio_cpu": round((carnet_pg.seconds + api_cpu) / max(copy_pg.seconds, 0.1), 2),
        "segment_counts": segment_counts, "bar_count": BAR_COUNT,
        "backend_cpu_ms_per_1000_events": key_ms,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1m_before": load_before,
                    "load_1m_after": os.getloadavg()[0]},
    }
    print(json.dumps(result, indent=2))
    print(f"ingest: {result['ratio_ingest']}x the raw COPY (bar <= {BAR_INGEST}x), CPU {result['ratio_cpu']}x; "
          "segment counts: "
          + ", ".join(f"{t} {c['ratio']}x" for t, c in segment_counts.items()) + f" the hand SQL (bar <= {BAR_COUNT}x)")
    OUT.mkdir(exist_ok=True)
    (OUT / "events.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep_db:
        asyncio.run(recreate(args.server, args.db, drop_only=True))


if __name__ == "__main__":
    main()
