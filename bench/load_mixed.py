"""Mixed-traffic load test against a live Carnet: reads, upserts, order PUTs, segment counts, list subscribes.

    .venv/bin/python bench/load_mixed.py [--duration 300] [--concurrency 16] [--mix read=40,upsert=20,...]
    bin/load                              # the same, with its defaults (5 minutes)

By default it builds everything itself: a fresh database `carnet_load` on --pg (127.0.0.1:5432, or
$LOAD_PG_URL; an embedded PostgreSQL in a temporary directory when that server cannot be reached and
--pg was not given), migrated, with --seed-contacts contacts loaded by COPY; then a `carnet serve`
process on a free port (one uvicorn worker, LOG_LEVEL=WARNING, the per-token rate limit and cap on costly
reads lifted because one token drives all the load), a few segments and lists made through the API. `--base-url URL --token T`
drives an already running server instead (it then makes its own contacts, segments and lists first).

The load is a closed loop: --concurrency clients, each sending its next request when the previous one
answers, each request drawn from the mix. Every answer other than 2xx (and every transport error) is an
error. At the end: per operation count, errors, error rate, p50/p95/p99/max latency, printed as a
Markdown table and written with all status counts to --out (bench/out/load_mixed.json). The run fails
(exit 1) on any error, or if the server process died or logged a crash; the server's log is kept in
bench/out/load_mixed_server.log.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db import async_url, plain_dsn  # noqa: E402
from app.security import Role  # noqa: E402
from app.security.tokens import issue_access_token  # noqa: E402

OUT = ROOT / "bench" / "out"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
DEFAULT_MIX = "read=40,upsert=20,order=20,segment_count=10,subscribe=10"
PROOF = {"ip": "203.0.113.7", "user_agent": "load_mixed", "form_url": "https://shop.example/newsletter",
         "wording": "Yes, send me the newsletter", "policy_version": "2026-01"}
SEGMENT_FILTERS = [
    {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"}]},
    {"all": [{"field": "tags", "op": "contains", "value": "newsletter"},
             {"field": "kind", "op": "eq", "value": "prospect"}]},
    {"all": [{"field": "orders.count", "op": "gte", "value": 1, "within_days": 90},
             {"field": "address.city", "op": "eq", "value": "Paris"}]},
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300, help="seconds of measured load (default 300)")
    p.add_argument("--warmup", type=float, default=5, help="unrecorded seconds of the same load first (default 5)")
    p.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop (default 16)")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"operation weights (default {DEFAULT_MIX})")
    p.add_argument("--seed-contacts", type=int, default=20_000)
    p.add_argument("--pg", default=None, help="PostgreSQL server URL without database "
                   "(default $LOAD_PG_URL or postgresql://postgres@127.0.0.1:5432, else an embedded one)")
    p.add_argument("--db", default="carnet_load")
    p.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    p.add_argument("--pool-size", type=int, default=None, help="DATABASE_POOL_SIZE of the server (default: its own)")
    p.add_argument("--base-url", default=None, help="drive this running server instead of starting one")
    p.add_argument("--token", default=None, help="admin token for --base-url")
    p.add_argument("--out", type=Path, default=OUT / "load_mixed.json")
    p.add_argument("--seed", type=int, default=42, help="random seed of the request mix")
    args = p.parse_args()
    try:
        args.mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(",") if part)}
    except ValueError:
        p.error("--mix takes name=weight pairs, e.g. read=50,upsert=50")
    if unknown := set(args.mix) - set(OPERATIONS):
        p.error(f"--mix: unknown operation(s) {sorted(unknown)}; known: {sorted(OPERATIONS)}")
    if args.base_url and not args.token:
        p.error("--base-url needs --token (an admin token for that server)")
    return args


# ---- setup: database, server, fixtures -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_context(args: argparse.Namespace) -> dict[str, Any]:
    """What a result file records about its run: when, where, how loaded the machine was, the arguments."""
    return {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
            "args": {k: str(v) for k, v in vars(args).items()}}


def with_database(server_url: str, db: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(async_url(server_url)).set(database=db).render_as_string(hide_password=False)


async def recreate_database(server_url: str, db: str, *, drop_only: bool = False) -> None:
    conn = await asyncpg.connect(plain_dsn(with_database(server_url, "postgres")), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        if not drop_only:
            await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()


async def reachable(server_url: str) -> bool:
    try:
        conn = await asyncpg.connect(plain_dsn(with_database(server_url, "postgres")), timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


@dataclass(frozen=True)
class Seeded:
    id: str
    external_id: str
    email: str


async def seed_contacts(url: str, rows: int) -> list[Seeded]:
    """COPY `rows` contacts shaped like Carnet's own (normalized email and phone), as bench_api.py does."""
    rng = random.Random(7)
    now = dt.datetime.now(dt.UTC)
    cities = [("Paris", "75011"), ("Lyon", "69003"), ("Nantes", "44000"), ("Lille", "59000"), ("Bordeaux", "33000")]
    records, keys = [], []
    for i in range(rows):
        cid, ext, email = uuid.uuid4(), f"load-{i:06d}", f"load{i:06d}@load-mail.com"
        city, postal = rng.choice(cities)
        created = now - dt.timedelta(days=rng.randint(0, 900))
        records.append((cid, ext, email, "unverified", f"+336{rng.randint(10_000_000, 99_999_999)}",
                        rng.choice(["Claire", "Louis", "Emma", "Hugo"]), rng.choice(["Martin", "Durand", "Petit"]),
                        postal, city, "FR", "import", "prospect", "prospect",
                        ["newsletter"] if i % 3 == 0 else [], created, created, 1))
        keys.append(Seeded(str(cid), ext, email))
    conn = await asyncpg.connect(plain_dsn(url), timeout=10)
    try:
        await conn.copy_records_to_table("contact", records=records, columns=[
            "id", "external_id", "email", "email_status", "phone", "first_name", "last_name", "postal_code", "city",
            "country", "source", "kind", "lifecycle_stage", "tags", "created_at", "updated_at", "version"])
        await conn.execute("VACUUM ANALYZE contact")
    finally:
        await conn.close()
    return keys


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    database_url: str, secret: str, workdir: Path, pool_size: int | None, *, one_token_load: bool = True
) -> Server:
    port = free_port()
    log = workdir / "carnet.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "JWT_"))}
    env |= {"DATABASE_URL": database_url, "JWT_SECRET": secret, "DATA_DIR": str(workdir / "data"),
            "LOG_LEVEL": "WARNING"}
    if one_token_load:  # one token drives all the load: its per-token limits would refuse the load itself
        env |= {"RATE_LIMIT_PER_SECOND": "1000000", "RATE_LIMIT_BURST": "1000000", "COSTLY_READS_PER_TOKEN": "1000"}
    if pool_size:
        env["DATABASE_POOL_SIZE"] = str(pool_size)
    carnet = Path(sys.executable).with_name("carnet")
    with log.open("wb") as handle:
        proc = subprocess.Popen([str(carnet), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=workdir,
                                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, port, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load_mixed: carnet serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.base_url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    sys.exit("load_mixed: carnet serve not ready after 120 s")


@dataclass
class World:
    contacts: list[Seeded]
    segments: list[str]
    lists: list[str]


async def make_fixtures(http: httpx.AsyncClient, contacts: list[Seeded]) -> World:
    async def created(response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 201:
            sys.exit(f"load_mixed: setup failed: {response.request.method} {response.request.url.path} "
                     f"{response.status_code} {response.text[:300]}")
        return response.json()  # type: ignore[no-any-return]

    if not contacts:  # --base-url: the server's data is not ours; make our own contacts through the API
        for i in range(500):
            key = f"load-{uuid.uuid4().hex[:10]}"
            row = await created(await http.post("/v1/contacts", json={
                "external_id": key, "email": f"{key}@load-mail.com", "address": {"city": ["Paris", "Lyon"][i % 2]}}))
            contacts.append(Seeded(row["id"], key, row["email"]))
    tag = uuid.uuid4().hex[:6]
    segments = [(await created(await http.post("/v1/segments", json={"name": f"load-{tag}-{i}", "filter": f})))["id"]
                for i, f in enumerate(SEGMENT_FILTERS)]
    lists = [(await created(await http.post("/v1/lists", json={"name": f"load-{tag}-{i}"})))["id"] for i in range(3)]
    return World(contacts, segments, lists)


# ---- the operations ------------------------------------------------------------------------------------


@dataclass
class Client:
    """One closed-loop client: its own counters for new keys and the orders it placed."""

    number: int
    rng: random.Random
    world: World
    sent: int = 0
    orders: list[tuple[str, str]] = field(default_factory=list)  # (external_id, contact email)

    def next_key(self, kind: str) -> str:
        self.sent += 1
        return f"{kind}-{self.number}-{self.sent}-{secrets.token_hex(3)}"


async def op_read(http: httpx.AsyncClient, c: Client) -> httpx.Response:
    return await http.get(f"/v1/contacts/{c.rng.choice(c.world.contacts).id}")


async def op_upsert(http: httpx.AsyncClient, c: Client) -> httpx.Response:
    if c.rng.random() < 0.2:  # an existing contact, a changed first name
        who = c.rng.choice(c.world.contacts)
        body = {"external_id": who.external_id, "email": who.email, "first_name": f"Again{c.rng.randrange(10_000)}"}
    else:
        key = c.next_key("up")
        body = {"external_id": key, "email": f"{key}@new.load-mail.com", "first_name": "New", "last_name": "Load",
                "phone": "06 12 34 56 78"}
    return await http.post("/v1/contacts/upsert", json=body)


async def op_order(http: httpx.AsyncClient, c: Client) -> httpx.Response:
    if c.orders and c.rng.random() < 0.3:  # an update: the order ships
        external_id, email = c.rng.choice(c.orders)
        status = "shipped"
    else:
        external_id, email, status = c.next_key("ord"), c.rng.choice(c.world.contacts).email, "paid"
        c.orders.append((external_id, email))
    quantity = c.rng.randint(1, 3)
    body = {"contact": {"email": email}, "placed_at": dt.datetime.now(dt.UTC).isoformat(), "status": status,
            "currency": "EUR", "total_amount": f"{quantity * 19.9:.2f}", "channel": "web",
            "items": [{"sku": f"SKU-{c.rng.randrange(50)}", "category": c.rng.choice(["shoes", "bags", "hats"]),
                       "quantity": quantity, "unit_price": "19.90"}]}
    return await http.put(f"/v1/orders/{external_id}", json=body)


async def op_segment_count(http: httpx.AsyncClient, c: Client) -> httpx.Response:
    return await http.get(f"/v1/segments/{c.rng.choice(c.world.segments)}/count")


async def op_subscribe(http: httpx.AsyncClient, c: Client) -> httpx.Response:
    list_id, who = c.rng.choice(c.world.lists), c.rng.choice(c.world.contacts)
    return await http.put(f"/v1/lists/{list_id}/members/{who.id}", json={"source": "load", "consent": {"proof": PROOF}})


OPERATIONS: dict[str, Callable[[httpx.AsyncClient, Client], Awaitable[httpx.Response]]] = {
    "read": op_read, "upsert": op_upsert, "order": op_order, "segment_count": op_segment_count,
    "subscribe": op_subscribe,
}


# ---- the load ------------------------------------------------------------------------------------------


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds, successes and errors alike
    statuses: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    samples: list[str] = field(default_factory=list)  # first few error bodies, to diagnose

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = len(lat)

        def pct(p: float) -> float | None:
            return round(lat[min(n - 1, int(p / 100 * n))] * 1000, 1) if n else None

        return {"requests": n, "rps": round(n / seconds, 1), "errors": self.errors,
                "error_rate": round(self.errors / n, 6) if n else None, "p50_ms": pct(50), "p95_ms": pct(95),
                "p99_ms": pct(99), "max_ms": round(lat[-1] * 1000, 1) if n else None,
                "mean_ms": round(statistics.fmean(lat) * 1000, 1) if n else None,
                "statuses": dict(self.statuses), "error_samples": self.samples}


async def run_load(base_url: str, token: str, world: World, args: argparse.Namespace) -> tuple[dict[str, Stats], float]:
    names, weights = list(args.mix), list(args.mix.values())
    stats = {name: Stats() for name in names}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=30) as http:
        record = False
        started = deadline = 0.0

        async def client(number: int) -> None:
            c = Client(number, random.Random(args.seed * 1000 + number), world)
            while time.monotonic() < deadline:
                name = c.rng.choices(names, weights)[0]
                t0 = time.perf_counter()
                try:
                    response = await OPERATIONS[name](http, c)
                    status, body = str(response.status_code), response.text
                except httpx.HTTPError as exc:
                    status, body = type(exc).__name__, ""
                elapsed = time.perf_counter() - t0
                if not record:
                    continue
                s = stats[name]
                s.latencies.append(elapsed)
                s.statuses[status] += 1
                if not status.startswith("2"):
                    s.errors += 1
                    if len(s.samples) < 5:
                        s.samples.append(f"{status} {body[:300]}")

        deadline = time.monotonic() + args.warmup
        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
        record, started = True, time.monotonic()
        deadline = started + args.duration
        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
        return stats, time.monotonic() - started


def report(
    stats: dict[str, Stats], seconds: float, args: argparse.Namespace, context: dict[str, Any]
) -> dict[str, Any]:
    total = Stats()
    for s in stats.values():
        total.latencies += s.latencies
        total.statuses.update(s.statuses)
        total.errors += s.errors
    result = {"context": context, "duration_s": round(seconds, 1), "concurrency": args.concurrency, "mix": args.mix,
              "operations": {name: s.summary(seconds) for name, s in stats.items()},
              "total": total.summary(seconds)}
    print(f"\nMixed load: {seconds:.0f} s, {args.concurrency} clients, mix {args.mix}\n")
    print("| operation | requests | req/s | errors | error rate | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in [*result["operations"].items(), ("**all**", result["total"])]:
        print(f"| {name} | {row['requests']} | {row['rps']} | {row['errors']} | {row['error_rate']:.4%} | "
              f"{row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {row['max_ms']} |")
    for name, row in result["operations"].items():
        for sample in row["error_samples"]:
            print(f"  error sample {name}: {sample}")
    return result


# ---- main ----------------------------------------------------------------------------------------------


async def pick_server(args: argparse.Namespace) -> tuple[str, Any]:
    """The PostgreSQL server to create the load database on; an embedded one if none answers."""
    given = args.pg or os.environ.get("LOAD_PG_URL")
    url = given or DEFAULT_PG
    if await reachable(url + "/postgres"):
        return url + "/postgres", None
    if given:
        sys.exit(f"load_mixed: cannot reach PostgreSQL at {given}")
    from app.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="carnet-load-")))
    print("load_mixed: no PostgreSQL on 127.0.0.1:5432; using an embedded one", file=sys.stderr)
    return embedded.start(), embedded


def main() -> int:
    args = parse_args()
    context = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
               "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    if args.base_url:
        token = args.token
        world = asyncio.run(_fixtures(args.base_url, token, []))
        stats, seconds = asyncio.run(run_load(args.base_url, token, world, args))
        failed_server = False
    else:
        server_url, embedded = asyncio.run(pick_server(args))
        database_url = with_database(server_url, args.db)
        workdir = Path(tempfile.mkdtemp(prefix="carnet-load-"))
        server = None
        try:
            asyncio.run(recreate_database(server_url, args.db))
            from app.migrations import upgrade

            upgrade(database_url)
            t0 = time.monotonic()
            contacts = asyncio.run(seed_contacts(database_url, args.seed_contacts))
            print(f"load_mixed: seeded {len(contacts)} contacts in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            secret = secrets.token_urlsafe(40)
            token = issue_access_token(secret, subject="load@bench", role=Role.ADMIN, ttl_seconds=24 * 3600).token
            server = start_server(database_url, secret, workdir, args.pool_size)
            world = asyncio.run(_fixtures(server.base_url, token, contacts))
            print(f"load_mixed: {args.warmup:.0f} s warm-up, then {args.duration:.0f} s of load on {server.base_url}",
                  file=sys.stderr)
            stats, seconds = asyncio.run(run_load(server.base_url, token, world, args))
            failed_server = server.proc.poll() is not None
            crashes = [ln for ln in server.log.read_text(errors="replace").splitlines() if "request.crashed" in ln]
            context["server_crash_lines"] = crashes[:20]
            failed_server = failed_server or bool(crashes)
        finally:
            if server is not None:
                server.stop()
                OUT.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(server.log, OUT / "load_mixed_server.log")
            shutil.rmtree(workdir, ignore_errors=True)
            if not args.keep_db:
                asyncio.run(recreate_database(server_url, args.db, drop_only=True))
            if embedded is not None:
                embedded.stop()
                shutil.rmtree(embedded.pgdata.parent, ignore_errors=True)
    context["loadavg_after"] = os.getloadavg()
    result = report(stats, seconds, args, context)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.out}; load average before {context['loadavg_before']}, after {context['loadavg_after']}")
    if failed_server:
        print("load_mixed: FAILED: the server died or logged a crash (see server_crash_lines in the output)")
        return 1
    if result["total"]["errors"]:
        print(f"load_mixed: FAILED: {result['total']['errors']} error(s)")
        return 1
    return 0


async def _fixtures(base_url: str, token: str, contacts: list[Seeded]) -> World:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        return await make_fixtures(http, contacts)


if __name__ == "__main__":
    sys.exit(main())
