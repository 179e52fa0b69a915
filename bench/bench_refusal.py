"""The CPU of one refused costly read, against one contact read, through the whole ASGI app (issue 15, class 3).

    .venv/bin/python bench/bench_refusal.py              # ~1 min; results in bench/out/refusal.json
    .venv/bin/python bench/bench_refusal.py --requests 2000 --rounds 9

Under a flood of previews most costly reads are refused; each refusal used to cost the API about as much CPU as a
contact read, and the crowd's bursts of them stalled the event loop (docs/security.md, "Class 3"). Here, in one
process and one run: a scratch database with one contact and one segment, and apps on it with their real
lifespans, one with the costly-read gate (app.costly_gate, the default) and one without (COSTLY_READ_GATE=false: the
refusal comes from the route's dependency, after FastAPI routed the request and parsed its body). A viewer token
holds its two costly reads (COSTLY_READS_PER_TOKEN=2), so each of its previews and counts is refused with 429
`costly-reads-per-token`.

Each round runs --requests requests of each kind, in an order shuffled per round, called through the ASGI
interface directly (no HTTP client or server: what is measured is the app's own work, every middleware included,
logging too, written to /dev/null), timed by the process's CPU clock:

- `contact read`: `GET /v1/contacts/{id}` by another viewer (the fast path, 200): the reference;
- `refused preview`, with and without the gate: `POST /v1/segments/preview` with the flood's 4 KB body;
- `refused count`, with and without the gate: `GET /v1/segments/{id}/count`;
- `busy preview, gate (503)`: the preview on a third app whose two slots are held by other tokens, with
  COSTLY_READS_QUEUE=0: 503 `costly-reads-busy` at once (its answer is also logged as a warning).

Reported: CPU microseconds per request (median over rounds) and, per kind, the median over rounds of its ratio to
the contact read of the same round. The machine is shared: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import asyncpg  # noqa: E402
import scratch_db  # noqa: E402
from bench_costly import WORST_PREVIEW  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from load_mixed import run_context  # noqa: E402

from app.db import plain_dsn  # noqa: E402
from app.main import create_app  # noqa: E402
from app.security import Role  # noqa: E402
from app.security.tokens import issue_access_token  # noqa: E402
from app.settings import Settings  # noqa: E402

OUT = ROOT / "bench" / "out"
DB = "carnet_refusal_bench"
PREVIEW = json.dumps(WORST_PREVIEW).encode()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000, help="requests of each kind per round (default 1000)")
    p.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--out", type=Path, default=OUT / "refusal.json")
    return p.parse_args()


async def call(app: FastAPI, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> int:
    """One request through the ASGI interface: its status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("bench", 80)}
    status = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def settings_for(url: str, secret: str, *, gate: bool, queue: int | None = None) -> Settings:
    # Every default but the rate limit (lifted: thousands of requests of one token a second are what is timed) and
    # a pool per app sized for the two held reads.
    return Settings(database_url=url, jwt_secret=secret, rate_limit_per_second=1e9, rate_limit_burst=10**9,
                    lifecycle_refresh_seconds=0, database_pool_size=4, costly_reads_per_process=2,
                    costly_reads_per_token=2, costly_read_gate=gate, costly_reads_queue=queue)


async def seed(url: str) -> tuple[str, str]:
    """One contact and one segment; their ids."""
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        contact_id = await conn.fetchval("""
            INSERT INTO contact (id, email, email_status, kind, lifecycle_stage, attributes, tags, orders_count,
                                 total_spent, version, created_at, updated_at, source)
            VALUES (gen_random_uuid(), 'refusal@shop.example', 'unverified', 'prospect', 'prospect', '{}', '{}', 0, 0,
                    1, now(), now(), 'api') RETURNING id""")
        segment_id = await conn.fetchval("""
            INSERT INTO segment (id, name, filter, version, created_at, updated_at)
            VALUES (gen_random_uuid(), 'prospects', '{"all": [{"field": "kind", "op": "eq", "value": "prospect"}]}',
                    1, now(), now()) RETURNING id""")
    finally:
        await conn.close()
    return str(contact_id), str(segment_id)


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    secret = secrets.token_urlsafe(40)
    contact_id, segment_id = await seed(url)

    def auth(subject: str) -> tuple[list[tuple[bytes, bytes]], str]:
        issued = issue_access_token(secret, subject=subject, role=Role.VIEWER, ttl_seconds=3600)
        return [(b"authorization", f"Bearer {issued.token}".encode())], issued.token_id

    reader, _ = auth("reader@bench")
    crowd, crowd_id = auth("crowd@bench")
    json_crowd = [*crowd, (b"content-type", b"application/json"), (b"content-length", str(len(PREVIEW)).encode())]
    devnull = open(os.devnull, "w")  # noqa: SIM115, ASYNC230 (the apps' log handler writes there to the end)
    with contextlib.redirect_stderr(devnull):  # the handler is built on the stderr of the moment
        gated = create_app(settings_for(url, secret, gate=True))
        plain = create_app(settings_for(url, secret, gate=False))
        full = create_app(settings_for(url, secret, gate=True, queue=0))  # both slots held by others, no queue
    kinds: dict[str, Callable[[], Awaitable[int]]] = {
        "contact read": lambda: call(gated, "GET", f"/v1/contacts/{contact_id}", reader),
        "refused preview, gate": lambda: call(gated, "POST", "/v1/segments/preview", json_crowd, PREVIEW),
        "refused preview, no gate": lambda: call(plain, "POST", "/v1/segments/preview", json_crowd, PREVIEW),
        "refused count, gate": lambda: call(gated, "GET", f"/v1/segments/{segment_id}/count", crowd),
        "refused count, no gate": lambda: call(plain, "GET", f"/v1/segments/{segment_id}/count", crowd),
        "busy preview, gate (503)": lambda: call(full, "POST", "/v1/segments/preview", json_crowd, PREVIEW),
    }
    expected = {k: 200 if k == "contact read" else 503 if "503" in k else 429 for k in kinds}
    cpu_us: dict[str, list[float]] = {k: [] for k in kinds}
    ratios: dict[str, list[float]] = {k: [] for k in kinds}
    async with contextlib.AsyncExitStack() as stack:
        for app in (gated, plain, full):
            await stack.enter_async_context(app.router.lifespan_context(app))
            while app.state.revocations.is_revoked("warm-up") is None:  # noqa: ASYNC110 (listening: no query per token)
                await asyncio.sleep(0.05)
            for holder in ("holder-1", "holder-2") if app is full else (crowd_id, crowd_id):
                # the crowd's token holds its share (its next costly read: 429), or two others hold both slots (503)
                await stack.enter_async_context(app.state.costly_reads.slot(holder))
        for kind, run in kinds.items():  # warm-up, and every kind answers what it should
            statuses = {await run() for _ in range(50)}
            if statuses != {expected[kind]}:
                sys.exit(f"bench_refusal: {kind} answered {statuses}, expected {expected[kind]}")
        rng = random.Random(15)
        for _ in range(args.rounds):
            order = list(kinds)
            rng.shuffle(order)
            this_round = {}
            for kind in order:
                run = kinds[kind]
                started = time.process_time()
                for _ in range(args.requests):
                    await run()
                this_round[kind] = (time.process_time() - started) / args.requests * 1e6
            for kind, us in this_round.items():
                cpu_us[kind].append(round(us, 1))
                ratios[kind].append(round(us / this_round["contact read"], 3))
    return {kind: {"cpu_us_median": round(statistics.median(cpu_us[kind]), 1),
                   "ratio_to_contact_read_median": round(statistics.median(ratios[kind]), 3),
                   "cpu_us_rounds": cpu_us[kind], "ratios_rounds": ratios[kind]} for kind in kinds}


def main() -> int:
    args = parse_args()
    context = run_context(args)
    context["cpu_pressure_before"] = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    url = asyncio.run(scratch_db.recreate(f"{DB}_{uuid.uuid4().hex[:6]}"))
    try:
        results = asyncio.run(measure(args, url))
    finally:
        asyncio.run(scratch_db.drop(url.rsplit("/", 1)[1]))
    context["loadavg_after"] = os.getloadavg()
    context["cpu_pressure_after"] = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kinds": results, "context": context}, indent=2) + "\n")
    print("\n| kind | CPU µs per request (median) | ratio to a contact read (median of rounds) |\n|---|---:|---:|")
    for kind, row in results.items():
        print(f"| {kind} | {row['cpu_us_median']} | {row['ratio_to_contact_read_median']} |")
    gate = results["refused preview, gate"]["cpu_us_median"]
    print(f"\nrefused preview, no gate / gate: {results['refused preview, no gate']['cpu_us_median'] / gate:.1f}x; "
          f"load average before {context['loadavg_before']}, after {context['loadavg_after']}; "
          f"{context['cpu_pressure_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
