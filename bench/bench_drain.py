"""Outbox drain to the local fake vendors, with the vendors' limits enforced by the fakes.

    .venv/bin/python bench/bench_drain.py [--messages 100000] [--vendor brevo|mailchimp|both] [--orders]

What it does, per vendor, in one database created for the run (`carnet_bench_drain`, dropped after):
  1. Seeds N contacts already known to the vendor (sync links and remote records exist: the steady state
     of a shop), one mapped list, and N outbox messages `membership.subscribed` (COPY-speed SQL).
  2. Starts the fake (the same spec-checking fake the tests use) on loopback with its limit on:
     Brevo 10 requests/s per API key (429 beyond), Mailchimp 10 simultaneous connections (429 beyond), each
     answer taking --brevo-latency / --mailchimp-latency seconds (a real vendor is not instant).
  3. Runs Carnet's worker (the production `create_worker`) until the outbox is drained; measures the vendor
     calls, the busiest 1-second window, the 429s, the mean concurrency, and the final remote state.
  4. The bar (ARCHITECTURE.md): >= 90% of the vendor's allowed rate, 0 requests over the limit, 0 lost.
     For Brevo the allowed rate is 10 calls/s; for Mailchimp, 10 calls in flight at all times.
With --orders (issue 20), the messages are orders instead: one order of 3 lines (from a catalogue of
`CATALOGUE` products, each at one price) per contact and one `commerce.order_changed` message each, to a
destination with `push_orders` (Mailchimp: a `store_id` the worker creates). Lost = orders missing at the vendor;
an order that reached the vendor before one of its products counts as a violation (Carnet's rule: products first).
With --floor (Mailchimp), the same fake and data, but instead of Carnet's worker a floor client in its own process
(`floor_client`): 10 connections each sending member upserts one after the other, nothing else (no database, no
planning). What it reaches is what this machine, at its load of the moment, lets any client reach; Carnet's
ratio over the floor's, runs alternated, is what Carnet itself costs.
Writes bench/out/drain.json (drain_orders.json with --orders, drain_floor.json with --floor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"

from app.security.secrets import SecretBox  # noqa: E402
from bench.scratch_db import drop, recreate, seed_prospects  # noqa: E402
from tests.fakes.brevo import FakeBrevo  # noqa: E402
from tests.fakes.mailchimp import FakeMailchimp, Member, subscriber_hash  # noqa: E402
from tests.fakes.server import LiveServer, max_in_window  # noqa: E402

DB = "carnet_bench_drain"
BREVO_KEY = "xkeysib-bench"
MC_KEY = "0123456789abcdef0123456789abcdef-us6"
MASTER = "bench-master-secret-" + "x" * 32
CATALOGUE = 300
STORE = "bench-store"


async def seed(url: str, vendor: str, n: int, remote_list: str, *, orders: bool = False) -> tuple[str, list[str]]:
    """N contacts in one mapped list, already pushed once (links), and one outbox message each (a membership, or
    with `orders` an order of 3 lines)."""
    box = SecretBox.from_setting(None, fallback_master=MASTER)
    conn = await asyncpg.connect(url)
    try:
        destination_id = uuid.uuid4()
        list_id = await seed_prospects(conn, n, "bench.example")
        await conn.execute("""
            INSERT INTO list_membership (list_id, contact_id, status, source, subscribed_at, updated_at)
            SELECT $1, id, 'subscribed', 'import', now(), now() FROM contact""", list_id)
        secrets = {"api_key": BREVO_KEY if vendor == "brevo" else MC_KEY, "inbound_secret": "bench-inbound"}
        await conn.execute("""
            INSERT INTO destination (id, kind, name, enabled, config, secrets, list_mappings, field_mappings,
                                     consecutive_failures, version, created_at, updated_at)
            VALUES ($1, $2, $2, true, $3::jsonb, $4, $5::jsonb, '{}'::jsonb, 0, 1, now(), now())""",
            destination_id, vendor, json.dumps({"base_url": "http://placeholder", **commerce_config(vendor, orders)}),
            box.seal(secrets),
            json.dumps([{"list_id": str(list_id), "remote_list_id": remote_list, "double_opt_in": False}]))
        ref = "md5(email)" if vendor == "mailchimp" else "row_number() OVER ()::text"
        await conn.execute(f"""
            INSERT INTO sync_link (destination_id, contact_id, remote_ref, synced_at)
            SELECT $1, id, {ref}, now() FROM contact""", destination_id)
        if orders:
            await seed_orders(conn)
        else:
            await conn.execute("""
                INSERT INTO outbox_message (topic, contact_id, payload, created_at)
                SELECT 'membership.subscribed', id,
                       jsonb_build_object('list_id', $1::text, 'contact_id', id::text), now()
                FROM contact""", str(list_id))
        await conn.execute("ANALYZE")
        emails = [r["email"] for r in await conn.fetch("SELECT email FROM contact")]
        return str(destination_id), emails
    finally:
        await conn.close()


def commerce_config(vendor: str, orders: bool) -> dict[str, Any]:
    if not orders:
        return {}
    return {"push_orders": True, **({"store_id": STORE, "store_currency": "EUR"} if vendor == "mailchimp" else {})}


async def seed_orders(conn: asyncpg.Connection) -> None:
    """One paid order of 3 lines per contact (skus from the catalogue), and its outbox message.

    A sku always has the same price (8.00 to 12.00 by its number), as in a shop: the catalogue goes to the vendor
    once and then only orders do. (Until 2026-12-06 the third line was 8.00 and the others 10.00, so each sku had
    two prices and every push found its products changed: 35% of Mailchimp's calls were products sent again.)"""
    sku = "((n + {k}) % {c})"
    price = "(8 + " + sku + " % 5)"
    line = ("jsonb_build_object('sku', 'SKU-' || " + sku + ", 'name', 'Item ' || " + sku + ", "
            "'category', 'cat-' || " + sku + " % 7, 'quantity', {q}, 'unit_price', " + price + "::text || '.00')")
    shape = ((0, 1), (1, 1), (2, 2))      # (line, quantity)
    lines = ", ".join(line.format(k=k, c=CATALOGUE, q=q) for k, q in shape)
    total = " + ".join(f"{q} * " + price.format(k=k, c=CATALOGUE) for k, q in shape)
    await conn.execute(f"""
        INSERT INTO "order" (id, external_id, contact_id, placed_at, status, currency, total_amount, items,
                             created_at, updated_at)
        SELECT gen_random_uuid(), 'B-' || n, id, now() - interval '1 hour', 'paid', 'EUR', {total},
               jsonb_build_array({lines}), now(), now()
        FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM contact) c""")
    await conn.execute("""
        INSERT INTO outbox_message (topic, contact_id, payload, created_at)
        SELECT 'commerce.order_changed', contact_id,
               jsonb_build_object('order_id', id::text, 'external_id', external_id), now()
        FROM "order" ORDER BY external_id""")


async def point_at(url: str, destination_id: str, base_url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE destination SET config = config || jsonb_build_object('base_url', $2::text) "
                           "WHERE id = $1", uuid.UUID(destination_id), base_url)
    finally:
        await conn.close()


async def remaining(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM delivery GROUP BY status")
        undispatched = await conn.fetchval("SELECT count(*) FROM outbox_message WHERE dispatched_at IS NULL")
        return {**{r["status"]: r["n"] for r in rows}, "undispatched": undispatched}
    finally:
        await conn.close()


@contextlib.contextmanager
def no_full_collections() -> Iterator[None]:
    """The fake's process without gen-2 garbage collections while it measures. The fake keeps every order and
    request it saw; a full pass over them stopped its event loop for 0.45 s (a gc callback's log), so the arrivals
    of that half second were stamped as one instant and the fake refused the next ones: 429s of its own making,
    which a vendor's front door, stamping requests as they come, would not give. Young generations still run."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 1_000_000_000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def floor_client(base_url: str, emails: list[str], connections: int) -> None:
    """`connections` loops, each a member upsert after the other until `emails` are all sent (the floor)."""
    import httpx

    todo = iter(emails)
    async with httpx.AsyncClient(base_url=base_url, auth=("floor", MC_KEY),
                                 limits=httpx.Limits(max_connections=connections)) as client:
        async def loop() -> None:
            for email in todo:
                response = await client.put(f"/lists/mc-news/members/{subscriber_hash(email)}",
                                            json={"email_address": email, "status_if_new": "subscribed"})
                response.raise_for_status()

        await asyncio.gather(*(loop() for _ in range(connections)))


async def run_vendor(vendor: str, n: int, latency: float, *, orders: bool = False,
                     floor: bool = False) -> dict[str, Any]:
    url = await recreate(DB)
    remote_list = "7" if vendor == "brevo" else "mc-news"
    t0 = time.perf_counter()
    destination_id, emails = await seed(url, vendor, n, remote_list, orders=orders)
    seed_s = time.perf_counter() - t0
    if vendor == "brevo":
        fake: Any = FakeBrevo(api_key=BREVO_KEY, lists={7}, rate_limit=10)
        fake.seed(emails)  # the vendor already knows them (ids 1..n = the seeded sync links, in order)
    else:
        fake = FakeMailchimp(api_key=MC_KEY, lists={"mc-news"}, max_connections=10)
        fake.lists["mc-news"] = {subscriber_hash(e): Member(e, "unsubscribed") for e in emails}
    fake.delay = latency
    with no_full_collections(), LiveServer(fake) as live:
        await point_at(url, destination_id, live.url)
        # The production worker in its own process (`carnet worker --once`): the fake keeps this process's
        # CPU to itself, so the times it records are the vendor's, not our scheduler's.
        env = {**os.environ, "DATABASE_URL": url, "JWT_SECRET": MASTER, "SYNC_ALLOW_PRIVATE_NETWORKS": "true",
               "LOG_LEVEL": "WARNING"}
        start = time.perf_counter()
        floor_command = [sys.executable, str(ROOT / "bench" / "bench_drain.py"), "--floor-client", live.url,
                         "--messages", str(n)]
        command = floor_command if floor else [str(ROOT / ".venv" / "bin" / "carnet"), "worker", "--once"]
        worker = await asyncio.create_subprocess_exec(*command, env=env, cwd=str(ROOT))
        code = await worker.wait()
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"carnet worker exited with {code}")
    calls = [s for s in fake.seen if s.method != "GET"]
    arrivals = [s.at for s in calls]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"drain_{vendor}_calls.json").write_text(json.dumps(
        [{"at": s.at, "done_at": s.done_at, "status": s.status, "path": s.path} for s in calls]))
    window = (max(arrivals) - min(arrivals)) if len(arrivals) > 1 else 0.0
    refused = sum(1 for s in calls if s.status == 429)
    state = await remaining(url)
    violations = len(fake.violations)
    if orders:
        held = fake.orders if vendor == "brevo" else getattr(fake.stores.get(STORE), "orders", {})
        lost = n - len(held)
        violations += len(fake.orders_before_products) if vendor == "brevo" else 0
    if vendor == "brevo":
        lost = lost if orders else n - len(fake.members(7))
        allowed = 10.0
        achieved = len(calls) / window if window else 0.0
        measure = {"calls_per_second": round(achieved, 2), "allowed_per_second": allowed,
                   "busiest_1s_window": max_in_window(arrivals)}
        ratio = achieved / allowed
    else:
        if floor:
            lost = n - len(calls)
        elif not orders:
            lost = sum(1 for m in fake.lists["mc-news"].values() if m.status != "subscribed")
        busy = sum((s.done_at - s.at) for s in calls)
        mean_in_flight = busy / window if window else 0.0
        measure = {"mean_in_flight": round(mean_in_flight, 2), "allowed_in_flight": 10,
                   "batch_sizes": sorted(set(fake.batch_sizes))[-3:]}
        ratio = mean_in_flight / 10
    result = {
        "vendor": vendor, "messages": n,
        "kind": "floor: member upserts, no Carnet" if floor else "orders x 3 lines" if orders else "memberships",
        "latency_s": latency, "seed_s": round(seed_s, 1),
        "drain_wall_s": round(wall, 1), "vendor_calls": len(calls), "calls_window_s": round(window, 1),
        "refused_429": refused, "violations": violations, "lost": lost, "deliveries": state,
        **measure, "ratio_of_allowed": round(ratio, 3),
        "bar": ">= 0.90 of the allowed rate, 0 over the limit, 0 lost, 0 spec violations",
        "pass": ratio >= 0.9 and refused == 0 and lost == 0 and not violations,
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--vendor", choices=["brevo", "mailchimp", "both"], default="both")
    parser.add_argument("--brevo-latency", type=float, default=0.2, help="seconds per Brevo answer (a list call)")
    parser.add_argument("--mailchimp-latency", type=float, default=1.0,
                        help="seconds per Mailchimp answer (a 500-member batch takes seconds at the real one)")
    parser.add_argument("--orders", action="store_true", help="orders of 3 lines instead of memberships (issue 20)")
    parser.add_argument("--floor", action="store_true", help="Mailchimp: a bare client instead of Carnet's worker")
    parser.add_argument("--floor-client", metavar="URL", help=argparse.SUPPRESS)   # the floor's own process
    args = parser.parse_args()
    if args.floor_client:
        await floor_client(args.floor_client, [f"floor{i}@bench.example" for i in range(args.messages)], 10)
        return
    vendors = ["brevo", "mailchimp"] if args.vendor == "both" else [args.vendor]
    results = []
    try:
        for vendor in vendors:
            latency = args.brevo_latency if vendor == "brevo" else args.mailchimp_latency
            results.append(await run_vendor(vendor, args.messages, latency, orders=args.orders,
                                            floor=args.floor and vendor == "mailchimp"))
    finally:
        await drop(DB)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "drain_floor.json" if args.floor else "drain_orders.json" if args.orders else "drain.json"
    (OUT / name).write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["pass"] for r in results) else 1)


if __name__ == "__main__":
    asyncio.run(main())
