"""Outbox soak: many contact changes delivered to a fake vendor while retention purges behind them (issue 18).

    .venv/bin/python bench/soak_outbox.py [--changes 1000000] [--contacts 100000] [--wave 20000]
                                          [--keep-seconds 30] [--purge-seconds 5]

Not part of the test run (minutes). In one database created for the run (`carnet_soak_outbox`, dropped after):
  1. Seeds --contacts contacts known to the vendor (sync links, remote members), all in one mapped list.
  2. Starts the fake Mailchimp (the spec-checking fake of the tests, its 10-connection limit on) and the
     production worker in its own process (`carnet worker`) with OUTBOX_KEEP_DELIVERED_HOURS = --keep-seconds
     and OUTBOX_PURGE_SECONDS = --purge-seconds (short, so the soak shows many windows go by).
  3. Writes --changes contact changes in waves of --wave: each flips the list subscription of --wave distinct
     contacts and writes their outbox messages in one transaction (what the API writes, at SQL speed), then
     waits until the wave is delivered, and samples the two tables (rows, bytes with indexes and TOAST).
  4. After the last wave, waits for the window and one sweep to pass (and autovacuum to visit), then checks:
     - nothing undelivered was purged: triggers record every deleted outbox message that was not dispatched
       or that an undelivered delivery still referred to, and every deleted delivery that was not delivered
       (must be 0); the fake's status of every contact equals Carnet's (nothing lost);
     - the tables are back under the bound. The window W = keep + 2 sweeps (a row delivered at t goes at the
       first sweep that starts after t + keep; a sweep starts at most one interval after the previous one
       ended, and the sweep's vacuum follows it). Then, at every wave's end and at the end:
         rows  <= the messages delivered in the last W and their deliveries (0 at the end: no traffic in it);
         bytes <= the busiest window's messages x m1 + its deliveries x d1, so far (files never shrink: no
                  truncation), where m1 and d1 are the bytes per message and per delivery of the first wave (the
                  tables empty before it: each row with the versions it went through, 2 of a message, 3 of a
                  delivery, indexes and TOAST included), and the window is W plus how far back the last
                  vacuum's horizon may lie: 2 sweeps, plus the age of the oldest transaction then keeping VACUUM
                  from removing dead rows (sampled every 0.5 s: on a shared server, another database's long
                  COPY holds this one's dead rows too);
       and at the end no message dispatched, nor delivery delivered, before keep + one sweep ago, none owed.
       What the same changes take when kept (rows and bytes extrapolated from the first wave) is beside it.
Writes bench/out/soak_outbox.json (per wave: rows, bytes, their bounds, the age of the oldest transaction pinning
vacuum, the sweep's vacuums so far, the 1-minute load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"

from app.security.secrets import SecretBox  # noqa: E402
from bench.scratch_db import drop, recreate, seed_prospects  # noqa: E402
from tests.fakes.mailchimp import FakeMailchimp, Member, subscriber_hash  # noqa: E402
from tests.fakes.server import LiveServer  # noqa: E402

DB = "carnet_soak_outbox"
MC_KEY = "0123456789abcdef0123456789abcdef-us6"
MASTER = "bench-master-secret-" + "x" * 32
TABLES = ("outbox_message", "delivery")

# Every deleted message that something still needed: not dispatched, or an undelivered delivery refers to it.
# Row by row: each check is one probe of ix_delivery_message_id_undelivered.
_WATCH = """
CREATE TABLE soak_wrongly_purged (id bigint, why text);
CREATE FUNCTION soak_check_purge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.dispatched_at IS NULL THEN
        INSERT INTO soak_wrongly_purged VALUES (OLD.id, 'undispatched');
    ELSIF EXISTS (SELECT 1 FROM delivery d WHERE d.message_id = OLD.id AND d.status <> 'delivered') THEN
        INSERT INTO soak_wrongly_purged VALUES (OLD.id, 'undelivered');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER soak_check_purge AFTER DELETE ON outbox_message FOR EACH ROW EXECUTE FUNCTION soak_check_purge();
CREATE FUNCTION soak_check_delivery_purge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'delivered' THEN
        INSERT INTO soak_wrongly_purged VALUES (OLD.id, 'delivery ' || OLD.status);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER soak_check_delivery_purge AFTER DELETE ON delivery FOR EACH ROW
    EXECUTE FUNCTION soak_check_delivery_purge();
"""

# One wave: flip the subscription of contacts [lo, hi) (by their number) and write one outbox message each.
_WAVE = """
WITH flipped AS (
    UPDATE list_membership m
    SET status = CASE WHEN m.status = 'subscribed' THEN 'unsubscribed' ELSE 'subscribed' END,
        subscribed_at = CASE WHEN m.status = 'subscribed' THEN m.subscribed_at ELSE now() END,
        unsubscribed_at = CASE WHEN m.status = 'subscribed' THEN now() ELSE m.unsubscribed_at END,
        updated_at = now()
    FROM soak_contact s WHERE s.contact_id = m.contact_id AND s.no >= $1 AND s.no < $2
    RETURNING m.contact_id, m.list_id, m.status
)
INSERT INTO outbox_message (topic, contact_id, payload, created_at)
SELECT 'membership.' || status, contact_id,
       jsonb_build_object('list_id', list_id::text, 'contact_id', contact_id::text), now()
FROM flipped
"""


async def seed(conn: asyncpg.Connection, n: int, base_url: str) -> list[str]:
    """N contacts subscribed to one list mapped to the fake, already pushed once (links); their emails."""
    box = SecretBox.from_setting(None, fallback_master=MASTER)
    list_id = await seed_prospects(conn, n, "soak.example")
    await conn.execute("CREATE TABLE soak_contact AS SELECT row_number() OVER (ORDER BY email) - 1 AS no, "
                       "id AS contact_id FROM contact")
    await conn.execute("CREATE UNIQUE INDEX ON soak_contact (no)")
    await conn.execute("""
        INSERT INTO list_membership (list_id, contact_id, status, source, subscribed_at, updated_at)
        SELECT $1, id, 'subscribed', 'import', now(), now() FROM contact""", list_id)
    destination_id = uuid.uuid4()
    await conn.execute("""
        INSERT INTO destination (id, kind, name, enabled, config, secrets, list_mappings, field_mappings,
                                 consecutive_failures, version, created_at, updated_at)
        VALUES ($1, 'mailchimp', 'soak', true, $2::jsonb, $3, $4::jsonb, '{}'::jsonb, 0, 1, now(), now())""",
        destination_id, json.dumps({"base_url": base_url}),
        box.seal({"api_key": MC_KEY, "inbound_secret": "soak-inbound"}),
        json.dumps([{"list_id": str(list_id), "remote_list_id": "mc-news", "double_opt_in": False}]))
    await conn.execute("INSERT INTO sync_link (destination_id, contact_id, remote_ref, synced_at) "
                       "SELECT $1, id, md5(email), now() FROM contact", destination_id)
    await conn.execute(_WATCH)
    await conn.execute("ANALYZE")
    return [r["email"] for r in await conn.fetch("SELECT email FROM contact")]


async def sizes(conn: asyncpg.Connection) -> dict[str, int]:
    out = {}
    for table in TABLES:
        out[f"{table}_rows"] = await conn.fetchval(f"SELECT count(*) FROM {table}")
        out[f"{table}_bytes"] = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
    # The sweep's own VACUUMs (the test server runs with autovacuum off) and autovacuum's, so far.
    out["vacuums"] = int(await conn.fetchval(
        "SELECT coalesce(sum(vacuum_count + autovacuum_count), 0) FROM pg_stat_user_tables WHERE relname = ANY($1)",
        list(TABLES)))
    return out


# The oldest transaction that keeps VACUUM from removing this database's dead rows: one in this database with a
# snapshot, or one anywhere on the server with a transaction id (every snapshot taken here counts it as running).
# Other engineers' benches share the server: their long COPYs and INSERTs hold the soak's dead rows too.
_PINNED = """
SELECT coalesce(extract(epoch FROM now() - min(xact_start)), 0)::float8 FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' AND query NOT ILIKE 'vacuum%'
  AND (backend_xid IS NOT NULL OR (datname = current_database() AND backend_xmin IS NOT NULL))
"""


async def watch_horizon(conn: asyncpg.Connection, start: float, pins: list[tuple[float, float]]) -> None:
    """Every half second: (now, since when dead rows cannot be removed), in seconds of the run."""
    while True:
        age = await conn.fetchval(_PINNED)
        now = time.perf_counter() - start
        pins.append((round(now, 1), round(now - age, 1)))
        await asyncio.sleep(0.5)


def bounds(samples: list[dict[str, Any]], pins: list[tuple[float, float]], *, keep: float,
           purge: float) -> list[dict[str, float]]:
    """Per wave: the rows the window may hold, and the bytes the busiest window so far may take.

    A change delivered at d is purged by the first sweep that starts after d + keep: by d + keep + 2 sweeps (a
    sweep starts one interval after the previous one ended). Its rows' space is free again after the first vacuum
    whose horizon is past the purge: the sweep's own vacuum, unless a transaction older than the purge still
    runs. At time T the last vacuum ran at most 2 sweeps ago, and its horizon was that moment or the start of the
    oldest transaction then running: `pinned`, the earliest of those seen in the last 2 sweeps (T - 2 sweeps when
    nothing long runs). Everything purged after it may still hold space. So at the end of wave i:
        rows  <= 2 x the changes delivered after T - keep - 2 sweeps (a message and a delivery each);
        bytes <= (m1 + d1) x the changes delivered after pinned - keep - 2 sweeps, the most so far (the files
                 never shrink), m1 and d1 the bytes per message and per delivery of the first wave (the tables
                 empty before it: its rows with the versions they went through, indexes and TOAST included).
    A wave's changes count as delivered at its end (later than they were: the bound only grows)."""
    first = samples[0]
    per_change = (first["outbox_message_bytes"] + first["delivery_bytes"]) / first["changes"]
    out: list[dict[str, float]] = []
    busiest, previous = 0.0, 0
    waves: list[tuple[float, int]] = []  # (delivered at s, changes)
    for sample in samples:
        at = sample["s"]
        waves.append((at, sample["changes"] - previous))
        previous = sample["changes"]
        pinned = min([at] + [since for seen, since in pins if at - 2 * purge <= seen <= at])
        live = sum(n for d, n in waves if d > at - keep - 2 * purge)
        held = sum(n for d, n in waves if d > pinned - keep - 2 * purge)
        busiest = max(busiest, held * per_change)
        out.append({"rows_bound": 2 * live, "bytes_bound": round(busiest), "pinned_s": round(at - pinned, 1)})
    return out


async def waiting(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT (SELECT count(*) FROM outbox_message WHERE dispatched_at IS NULL)"
        " + (SELECT count(*) FROM delivery WHERE status <> 'delivered')"))


async def until_delivered(conn: asyncpg.Connection, worker: asyncio.subprocess.Process, *, within: float) -> None:
    deadline = time.monotonic() + within
    while await waiting(conn):
        if worker.returncode is not None:
            raise SystemExit(f"carnet worker exited with {worker.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"not delivered after {within} s: {await waiting(conn)} waiting")
        await asyncio.sleep(0.5)


def rows_of(sample: dict[str, Any]) -> int:
    return sum(sample[f"{t}_rows"] for t in TABLES)


def bytes_of(sample: dict[str, Any]) -> int:
    return sum(sample[f"{t}_bytes"] for t in TABLES)


def mb(n: float) -> float:
    return round(n / 1e6, 1)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    url = await recreate(DB)
    conn = await asyncpg.connect(url)
    pin_conn = await asyncpg.connect(url)
    fake = FakeMailchimp(api_key=MC_KEY, lists={"mc-news"}, max_connections=10)
    fake.delay = args.latency
    worker: asyncio.subprocess.Process | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        with LiveServer(fake) as live:
            emails = await seed(conn, args.contacts, live.url)
            fake.lists["mc-news"] = {subscriber_hash(e): Member(e, "subscribed") for e in emails}
            env = {**os.environ, "DATABASE_URL": url, "JWT_SECRET": MASTER, "SYNC_ALLOW_PRIVATE_NETWORKS": "true",
                   "LOG_LEVEL": os.environ.get("SOAK_LOG_LEVEL", "WARNING"), "LIFECYCLE_REFRESH_SECONDS": "0",
                   "OUTBOX_KEEP_DELIVERED_HOURS": str(args.keep_seconds / 3600),
                   "OUTBOX_PURGE_SECONDS": str(args.purge_seconds)}
            worker = await asyncio.create_subprocess_exec(str(ROOT / ".venv" / "bin" / "carnet"), "worker", env=env,
                                                          cwd=str(ROOT))
            samples: list[dict[str, Any]] = []
            written, wave_no, start = 0, 0, time.perf_counter()
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            pins: list[tuple[float, float]] = []
            watcher = asyncio.create_task(watch_horizon(pin_conn, start, pins))
            while written < args.changes:
                size = min(args.wave, args.changes - written)
                lo = (wave_no * args.wave) % args.contacts
                hi = min(lo + size, args.contacts)
                written += int((await conn.execute(_WAVE, lo, hi)).split()[-1])
                wave_no += 1
                await until_delivered(conn, worker, within=600)
                samples.append({"changes": written, "s": round(time.perf_counter() - start, 1),
                                **await sizes(conn), "load": os.getloadavg()[0]})
                if wave_no % 10 == 0 or written >= args.changes:
                    print(json.dumps(samples[-1]), flush=True)
            delivered_s = time.perf_counter() - start
            # The window and one sweep go by, then autovacuum gets a chance to visit (its naptime is 60 s).
            await asyncio.sleep(args.keep_seconds + 2 * args.purge_seconds)
            await asyncio.sleep(args.settle_seconds)
            end = await sizes(conn)
            worker.terminate()
            await worker.wait()
            worker = None
            wrongly = await conn.fetch("SELECT why, count(*) AS n FROM soak_wrongly_purged GROUP BY why")
            statuses = {r["email"]: r["status"] for r in await conn.fetch(
                "SELECT c.email, m.status FROM contact c JOIN list_membership m ON m.contact_id = c.id")}
            mismatched = sum(1 for e, status in statuses.items()
                             if (m := fake.member("mc-news", e)) is None or m.status != status)
            too_old = await conn.fetchval(
                "SELECT (SELECT count(*) FROM delivery WHERE status = 'delivered'"
                "        AND delivered_at < now() - $1::interval)"
                " + (SELECT count(*) FROM outbox_message WHERE dispatched_at < now() - $1::interval)",
                timedelta(seconds=args.keep_seconds + args.purge_seconds))
            undelivered = await waiting(conn)
            vacuums = {r["relname"]: r["n"] for r in await conn.fetch(
                "SELECT relname, autovacuum_count AS n FROM pg_stat_user_tables WHERE relname = ANY($1)",
                list(TABLES))}
    finally:
        if watcher is not None:
            watcher.cancel()
        if worker is not None:
            worker.terminate()
            await worker.wait()
        await conn.close()
        await pin_conn.close()
    first = samples[0]
    kept_rows = sum(first[f"{t}_rows"] for t in TABLES) / first["changes"] * written
    kept_bytes = sum(first[f"{t}_bytes"] for t in TABLES) / first["changes"] * written
    window_s = args.keep_seconds + 2 * args.purge_seconds
    for sample, bound in zip(samples, bounds(samples, pins, keep=args.keep_seconds, purge=args.purge_seconds),
                             strict=True):
        sample.update(bound)
    over = [i + 1 for i, s in enumerate(samples) if rows_of(s) > s["rows_bound"] or bytes_of(s) > s["bytes_bound"]]
    bytes_bound = samples[-1]["bytes_bound"]
    end_bytes, end_rows = bytes_of(end), rows_of(end)
    result = {
        "changes": written, "contacts": args.contacts, "wave": args.wave, "keep_seconds": args.keep_seconds,
        "purge_seconds": args.purge_seconds, "vendor_latency_s": args.latency, "started": started,
        "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_during_waves": [min(s["load"] for s in samples), max(s["load"] for s in samples)],
        "delivered_in_s": round(delivered_s, 1), "vendor_calls": len(fake.seen), "violations": len(fake.violations),
        "wrongly_purged": {r["why"]: r["n"] for r in wrongly}, "vendor_status_mismatches": mismatched,
        "end": end, "end_rows": end_rows, "end_mb": mb(end_bytes),
        "peak_rows": max(rows_of(s) for s in samples), "peak_mb": mb(max(bytes_of(s) for s in samples)),
        "window_s": window_s, "busiest_window_changes": max(s["rows_bound"] for s in samples) // 2,
        "longest_pin_s": max((seen - since for seen, since in pins), default=0.0),
        "bytes_per_message_first_wave": round(first["outbox_message_bytes"] / first["changes"]),
        "bytes_per_delivery_first_wave": round(first["delivery_bytes"] / first["changes"]),
        "bytes_bound_mb": mb(bytes_bound), "end_over_bound_bytes": round(end_bytes / bytes_bound, 3),
        "waves_over_bound": over,
        "if_kept_rows": round(kept_rows), "if_kept_mb": mb(kept_bytes),
        "end_over_kept_bytes": round(end_bytes / kept_bytes, 3),
        "older_than_window": too_old, "undelivered": undelivered, "vacuums": end["vacuums"],
        "autovacuums": vacuums,
        "bound": f"W = keep + 2 sweeps = {window_s:g} s. Every wave and the end: rows <= the messages delivered "
                 "in the last W and their deliveries; bytes <= (the first wave's bytes per message + per delivery, "
                 "the versions of its rows included) x the most changes delivered in W + pinned_s (2 sweeps + "
                 "the age of the oldest transaction holding vacuum's horizon then). End: 0 rows, 0 older "
                 "than keep + one sweep, 0 owed; nothing undelivered purged; the vendor equals Carnet",
    }
    result["pass"] = (not wrongly and mismatched == 0 and too_old == 0 and undelivered == 0 and end_rows == 0
                      and not over and end_bytes <= bytes_bound and not fake.violations)
    result["samples"] = samples
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--wave", type=int, default=20_000, help="changes per transaction (distinct contacts)")
    parser.add_argument("--keep-seconds", type=float, default=30.0, help="OUTBOX_KEEP_DELIVERED_HOURS, in seconds")
    parser.add_argument("--purge-seconds", type=float, default=5.0, help="OUTBOX_PURGE_SECONDS")
    parser.add_argument("--settle-seconds", type=float, default=70.0,
                        help="after the last sweep: time for autovacuum to visit (naptime 60 s)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per fake Mailchimp answer")
    parser.add_argument("--keep-db", action="store_true", help=f"leave the database ({DB}) for inspection")
    args = parser.parse_args()
    if args.wave > args.contacts:
        parser.error("--wave must not exceed --contacts (a wave changes distinct contacts)")
    try:
        result = await soak(args)
    finally:
        if not args.keep_db:
            await drop(DB)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak_outbox.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if not result["pass"]:
        raise SystemExit("soak failed")


if __name__ == "__main__":
    asyncio.run(main())
