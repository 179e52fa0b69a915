"""Contact export at scale: the streamed HTTP export vs PostgreSQL's raw `COPY ... TO STDOUT`, in one run.

    .venv/bin/python bench/bench_export.py [--contacts 1000000] [--runs 3] [--reuse-db] [--keep-db]

What it does:
  1. (Re)creates the database `carnet_bench_export` (or reuses it when it already holds --contacts contacts
     and --reuse-db is given), runs Carnet's migrations and loads the contacts with COPY (asyncpg
     `copy_records_to_table`): names with accents, E.164 phones, addresses over 300 cities, 0-3 tags, two
     custom attributes (so the export has `attr.` columns), stats on 50%. VACUUM ANALYZE.
  2. Starts Carnet in a live uvicorn (one worker, `--factory app.main:create_app`, DATABASE_URL set).
  3. Alternates, --runs times: the floor `COPY (SELECT * FROM contact) TO STDOUT (FORMAT csv)` read to the
     end by asyncpg on this machine, then `GET /v1/exports/contacts` (CSV, admin token) read to the end by
     httpx over loopback, sampling the server's RSS every 20 ms (psutil). Also once: the CSV export for a
     token without pii:read (the masked, cursor-driven path) and JSON Lines.
  4. Prints best-of-runs times, the ratio HTTP export / raw COPY (bar: <= 2.0) and the server's RSS before
     and at peak (bar: constant, i.e. a few MB of growth whatever the size); writes bench/out/export.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
PYTHON = sys.executable
SECRET = "bench-export-secret-" + "x" * 40
TARGET_RATIO = 2.0

FIRST = ["Claire", "Élodie", "Jean-Pierre", "Zoé", "François", "Hélène", "Loïc", "Chloé", "Théo", "Inès",
         "Mathis", "Léa", "Noémie", "Raphaël", "Gaëlle", "Jérôme", "Anaïs", "Benoît", "Cécile", "Maël"]
LAST = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
        "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier"]
STREETS = ["rue de la Paix", "avenue Jean Jaurès", "boulevard Voltaire", "place de l'Église", "chemin des Prés"]
TAGS = ["vip", "newsletter", "salon-2025", "b2b", "retail", "fidélité"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3, help="measured runs of each path (alternating)")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--db", default="carnet_bench_export")
    p.add_argument("--reuse-db", action="store_true", help="keep the data if the database holds --contacts rows")
    p.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ----------------------------------------------------------------------------------------------


async def existing_rows(args: argparse.Namespace) -> int | None:
    try:
        conn = await asyncpg.connect(f"{args.pg}/{args.db}")
    except asyncpg.InvalidCatalogNameError:
        return None
    try:
        return int(await conn.fetchval("SELECT count(*) FROM contact"))
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()


async def admin_sql(args: argparse.Namespace, sql: str) -> None:
    admin = await asyncpg.connect(f"{args.pg}/postgres")
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


def records(start: int, n: int, columns: list[str]) -> list[tuple[Any, ...]]:
    rng = random.Random(42 + start)
    now = datetime.now(UTC)
    out = []
    for i in range(start, start + n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        city = rng.randrange(300)
        created = now - timedelta(days=rng.random() * 1500)
        orders = rng.choice((0, 0, 0, 1, 2, 5))
        total = Decimal(rng.randrange(1000, 90000)) / 100 * orders
        row = {
            "id": uuid.uuid4(), "external_id": f"C{i:08d}" if rng.random() < 0.7 else None,
            "email": f"{first.lower()}.{last.lower()}.{i}@example.com", "email_status": "unverified",
            "phone": f"+336{rng.randrange(10**8):08d}" if rng.random() < 0.6 else None,
            "first_name": first, "last_name": last, "company": f"Société {city}" if rng.random() < 0.3 else None,
            "job_title": None, "sector": None, "gender": None, "birth_date": None,
            "address_line1": f"{rng.randrange(1, 200)} {rng.choice(STREETS)}", "address_line2": None,
            "postal_code": f"{10000 + city * 300:05d}", "city": f"Ville-{city}", "region": None, "country": "FR",
            "language": "fr", "source": "import", "first_contact_at": created, "first_contact_channel": "web",
            "kind": "customer" if orders else "prospect",
            "lifecycle_stage": "new_customer" if orders else "prospect",
            "attributes": json.dumps({"shoe_size": rng.randrange(35, 46), "colours": ["red"]}),
            "tags": rng.sample(TAGS, rng.randrange(4)),
            "orders_count": orders, "total_spent": total,
            "average_basket": (total / orders).quantize(Decimal("0.01")) if orders else None,
            "first_order_at": created if orders else None, "last_order_at": created if orders else None,
            "last_order_amount": (total / orders).quantize(Decimal("0.01")) if orders else None,
            "currency": "EUR" if orders else None, "created_at": created, "updated_at": created,
            "last_activity_at": created, "version": 1,
        }
        out.append(tuple(row[c] for c in columns))
    return out


async def generate(args: argparse.Namespace) -> float:
    from app.migrations import upgrade

    await admin_sql(args, f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')
    await admin_sql(args, f'CREATE DATABASE "{args.db}"')
    await asyncio.to_thread(upgrade, f"{args.pg}/{args.db}")
    conn = await asyncpg.connect(f"{args.pg}/{args.db}")
    try:
        await conn.set_type_codec("jsonb", encoder=lambda v: b"\x01" + v.encode(), decoder=lambda b: b[1:].decode(),
                                  schema="pg_catalog", format="binary")
        columns = [r["attname"] for r in await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'contact'::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum")]
        await conn.execute("INSERT INTO attribute_definition (name, type, options, created_at, updated_at) VALUES "
                           "('shoe_size', 'number', NULL, now(), now()), "
                           "('colours', 'multi_enum', ARRAY['red', 'blue'], now(), now())")
        started = time.perf_counter()
        batch = 100_000
        for start in range(0, args.contacts, batch):
            rows = records(start, min(batch, args.contacts - start), columns)
            await conn.copy_records_to_table("contact", records=rows, columns=columns)
            log(f"  {start + len(rows):,} contacts loaded")
        await conn.execute("VACUUM ANALYZE contact")
        return time.perf_counter() - started
    finally:
        await conn.close()


# ---- measuring -----------------------------------------------------------------------------------------


async def raw_copy(args: argparse.Namespace) -> tuple[float, int]:
    conn = await asyncpg.connect(f"{args.pg}/{args.db}")
    size = 0

    async def sink(data: bytes) -> None:
        nonlocal size
        size += len(data)

    try:
        started = time.perf_counter()
        await conn.copy_from_query("SELECT * FROM contact", output=sink, format="csv")
        return time.perf_counter() - started, size
    finally:
        await conn.close()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)


def http_export(base_url: str, token: str, params: dict[str, str], pid: int) -> dict[str, Any]:
    sampler = RssSampler(pid)
    before = sampler.process.memory_info().rss
    sampler.start()
    size = lines = 0
    started = time.perf_counter()
    first_byte = None
    with httpx.stream("GET", f"{base_url}/v1/exports/contacts", params=params,
                      headers={"Authorization": f"Bearer {token}"}, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_raw(65536):
            if first_byte is None:
                first_byte = time.perf_counter() - started
            size += len(chunk)
            lines += chunk.count(b"\n")
    elapsed = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    return {"seconds": elapsed, "bytes": size, "lines": lines, "first_byte_ms": round((first_byte or 0) * 1000, 1),
            "rss_before_mb": round(before / 2**20, 1), "rss_peak_mb": round(sampler.peak / 2**20, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"{args.pg}/{args.db}", "JWT_SECRET": SECRET, "LOG_LEVEL": "WARNING",
           "LIFECYCLE_REFRESH_SECONDS": "0", "PYTHONPATH": str(ROOT)}
    handle = (OUT / "server_export.log").open("wb")
    proc = subprocess.Popen(  # cwd=bench/out: no stray .env is read
        [PYTHON, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", "--log-level", "warning"], cwd=OUT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("bench_export: the server exited; see bench/out/server_export.log")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return proc, base_url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    sys.exit("bench_export: the server did not start")


def main() -> None:
    args = parse_args()
    from app.security import Role, Scope
    from app.security.tokens import issue_access_token

    loaded = None
    if args.reuse_db and asyncio.run(existing_rows(args)) == args.contacts:
        log(f"reusing {args.db} ({args.contacts:,} contacts)")
    else:
        log(f"loading {args.contacts:,} contacts with COPY into {args.db}")
        loaded = asyncio.run(generate(args))
        log(f"loaded in {loaded:.1f} s")
    admin = issue_access_token(SECRET, subject="bench", role=Role.ADMIN, scopes=None, ttl_seconds=3600).token
    masked = issue_access_token(SECRET, subject="bench-masked", role=Role.MANAGER,
                                scopes=frozenset({Scope.EXPORTS_READ}), ttl_seconds=3600).token
    proc, base_url = start_server(args)
    try:
        http_export(base_url, admin, {"format": "csv"}, proc.pid)  # warm-up: caches, imports, first plans
        copies, exports = [], []
        for run in range(args.runs):
            seconds, size = asyncio.run(raw_copy(args))
            copies.append({"seconds": seconds, "bytes": size})
            exports.append(http_export(base_url, admin, {"format": "csv"}, proc.pid))
            log(f"run {run + 1}: raw COPY {seconds:.2f} s ({size / 2**20:.0f} MB) | HTTP CSV export "
                f"{exports[-1]['seconds']:.2f} s ({exports[-1]['bytes'] / 2**20:.0f} MB), server RSS "
                f"{exports[-1]['rss_before_mb']} → peak {exports[-1]['rss_peak_mb']} MB")
        masked_run = http_export(base_url, masked, {"format": "csv"}, proc.pid)
        log(f"masked CSV (cursor path): {masked_run['seconds']:.2f} s, peak RSS {masked_run['rss_peak_mb']} MB")
        jsonl_run = http_export(base_url, admin, {"format": "jsonl"}, proc.pid)
        log(f"JSON Lines: {jsonl_run['seconds']:.2f} s, peak RSS {jsonl_run['rss_peak_mb']} MB")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    best_copy = min(c["seconds"] for c in copies)
    best_export = min(e["seconds"] for e in exports)
    ratio = best_export / best_copy
    rows_exported = exports[0]["lines"] - 1
    growth = max(e["rss_peak_mb"] - e["rss_before_mb"] for e in [*exports, masked_run, jsonl_run])
    print()
    print(f"contacts                 {args.contacts:>12,}   (exported rows: {rows_exported:,})")
    print(f"raw COPY TO STDOUT       {best_copy:>10.2f} s   ({args.contacts / best_copy:,.0f} rows/s)")
    print(f"HTTP CSV export          {best_export:>10.2f} s   ({args.contacts / best_export:,.0f} rows/s)")
    verdict = "OK" if ratio <= TARGET_RATIO else "OVER"
    print(f"ratio export / COPY      {ratio:>10.2f}     (bar <= {TARGET_RATIO}) {verdict}")
    print(f"masked CSV export        {masked_run['seconds']:>10.2f} s   (cursor + masking in Python)")
    print(f"JSON Lines export        {jsonl_run['seconds']:>10.2f} s")
    print(f"server RSS growth (max)  {growth:>10.1f} MB  (before → peak, any run)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "export.json").write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "contacts": args.contacts, "rows_exported": rows_exported, "load_seconds": loaded, "raw_copy": copies,
        "http_csv": exports, "http_csv_masked": masked_run, "http_jsonl": jsonl_run, "ratio": ratio,
        "rss_growth_mb": growth,
    }, indent=2))
    if not args.keep_db:
        asyncio.run(admin_sql(args, f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)'))
    if rows_exported != args.contacts:
        sys.exit(f"bench_export: exported {rows_exported} rows, expected {args.contacts}")


if __name__ == "__main__":
    main()
