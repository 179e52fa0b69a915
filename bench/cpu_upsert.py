"""The database's own CPU per upsert that creates a contact: Carnet's statement against the floor's, on one connection.

    .venv/bin/python bench/cpu_upsert.py [--upserts 1500] [--rounds 7] [--db carnet_cpu_upsert] [--keep-db]

`bench_api.py` measures the whole request (HTTP, the app, the database) and its ratio moves by ±0.1 with the
machine's load. This measures only the PostgreSQL backend: after `--seed` contacts and ANALYZE, one connection of
the app's own engine sends `contacts.fast_upsert` `--upserts` times (the body of bench_api.py's new contacts:
external_id, email, names, phone), then the floor's statement (bench/floor_app.py) as many times, alternating for
`--rounds` (one more first, to warm up, not counted); the figure is the
CPU the backend process spent (/proc/<pid>/stat, user + system) per statement, median of the rounds. Both write
the same `contact` table of a freshly migrated database, so what differs is what Carnet's statement does besides
(history and outbox rows, the suppression checks) and how much of it PostgreSQL sets up for each statement.
The statements commit one by one as in the API (autocommit), so each pays a WAL flush too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_events import recreate  # noqa: E402
from floor_app import UPSERT_SQL  # noqa: E402
from procfs import cpu_seconds as backend_cpu  # noqa: E402

from app.db import make_engine, make_sessionmaker, pooled_connection  # noqa: E402
from app.migrations import upgrade  # noqa: E402
from app.schemas.contacts import ContactUpsert  # noqa: E402
from app.security import Principal, Role  # noqa: E402
from app.services import contacts, suppressions  # noqa: E402

ACTOR = Principal(subject="bench", role=Role.INTEGRATION, scopes=frozenset(), token_id="bench")


async def measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    suppressions.configure(os.urandom(32).hex())
    engine = make_engine(url, pool_size=1)
    spent: dict[str, list[float]] = {"carnet": [], "floor": []}
    try:
        async with pooled_connection(make_sessionmaker(engine)) as connection:
            pid = connection.get_server_pid()
            for round_ in range(args.rounds + 1):  # the first round warms up (statement caches) and is not counted
                tag = f"{round_}-{time.time_ns()}"
                payloads = [ContactUpsert.model_validate({
                    "external_id": f"{tag}-{i}", "email": f"{tag}-{i}@new.bench-mail.com", "first_name": "New",
                    "last_name": "Bench", "phone": "06 12 34 56 78"}) for i in range(args.upserts)]
                before = backend_cpu(pid)
                for payload in payloads:
                    done = await contacts.fast_upsert(connection, payload, actor=ACTOR)
                    if done is None or not done.created:
                        raise SystemExit("the fast path declined a new contact: the figures would mean nothing")
                carnet = backend_cpu(pid) - before
                before = backend_cpu(pid)
                for i in range(args.upserts):
                    await connection.fetchrow(UPSERT_SQL, uuid.uuid4(), f"{tag}-f{i}", f"{tag}-f{i}@floor.example",
                                              "+33612345678", "New", "Bench", datetime.now(UTC))
                floor = backend_cpu(pid) - before
                if round_:
                    spent["carnet"].append(carnet / args.upserts * 1e6)
                    spent["floor"].append(floor / args.upserts * 1e6)
    finally:
        await engine.dispose()
    return spent


async def seed(url: str, rows: int) -> None:
    """A table with statistics: on an empty, never analyzed `contact`, the cached plan of the matching statement
    scans the whole table, and every statement costs more than the last until autovacuum analyzes it."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"""
            INSERT INTO contact (id, external_id, email, email_status, kind, lifecycle_stage, source, created_at,
                                 updated_at, version)
            SELECT gen_random_uuid(), 'seed-' || g, 'seed-' || g || '@seed.example', 'unverified', 'prospect',
                   'prospect', 'api', now(), now(), 1
            FROM generate_series(1, {int(rows)}) g""")
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upserts", type=int, default=1500, help="statements of each kind per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=50_000, help="contacts in the table before (then ANALYZE)")
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--db", default="carnet_cpu_upsert")
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args()
    url = asyncio.run(recreate(args.server, args.db))
    try:
        upgrade(url)
        asyncio.run(seed(url, args.seed))
        spent = asyncio.run(measure(url, args))
    finally:
        if not args.keep_db:
            asyncio.run(recreate(args.server, args.db, drop_only=True))
    carnet, floor = (statistics.median(spent[k]) for k in ("carnet", "floor"))
    print(f"backend CPU per new contact: Carnet {carnet:.0f} us, floor {floor:.0f} us, {carnet / floor:.2f}x "
          f"(rounds: Carnet {[round(x) for x in spent['carnet']]}, floor {[round(x) for x in spent['floor']]}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
